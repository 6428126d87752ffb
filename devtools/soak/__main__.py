import sys

from devtools.soak.runner import main

sys.exit(main())
