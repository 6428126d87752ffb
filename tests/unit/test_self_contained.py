"""The checkout is self-contained: no tracked file links or reads a sibling folder of the repo.

A fresh clone must test everything by itself; a link into a folder beside the repository (docs,
schemas) worked only where someone had that folder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SIBLING = "shared"  # spelled apart so this file does not match itself
FORBIDDEN = (
    f"../{SIBLING}",
    f"{SIBLING}/k8s-crds",
    f"{SIBLING}/CONTRACT",
    f"PUBSOCK_{SIBLING.upper()}_DIR",
)
SKIPPED_SUFFIXES = {".png", ".jpg", ".ico"}
SKIPPED_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}


def tracked_files() -> list[Path]:
    """git's list of files, or every file below the root outside caches (an exported tree)."""
    git = shutil.which("git")
    if git is not None and (REPO_ROOT / ".git").exists():
        names = subprocess.run(
            [git, "-C", str(REPO_ROOT), "ls-files", "-z"],
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        return [REPO_ROOT / name.decode() for name in names if name]
    return [
        path
        for path in REPO_ROOT.rglob("*")
        if path.is_file() and not SKIPPED_DIRS & set(path.relative_to(REPO_ROOT).parts)
    ]


def test_no_file_points_outside_the_checkout() -> None:
    found = []
    for path in tracked_files():
        if path.suffix in SKIPPED_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for needle in FORBIDDEN:
            if needle in text:
                found.append(f"{path.relative_to(REPO_ROOT)}: {needle}")
    assert found == []
