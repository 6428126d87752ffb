#!/usr/bin/env bash
# Installs the Debian packages that `make run` and `make test` need, only when missing.
set -euo pipefail

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# The browser tests (tests/e2e) drive Debian's Chromium through Playwright (never `playwright install`).
[ -x /usr/bin/chromium ] || need+=(chromium)

if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "missing Debian packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v gcloud >/dev/null 2>&1 || [ ! -d "$(gcloud info --format='value(installation.sdk_root)' 2>/dev/null)/platform/pubsub-emulator" ]; then
  echo "note: the Pub/Sub emulator (gcloud beta emulators pubsub) is not installed;" \
       "make run falls back to BROKER=memory and integration tests are skipped" >&2
fi
