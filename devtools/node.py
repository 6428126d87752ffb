"""Node packages of the tools and tests that drive Node clients (soak, socket.io suites)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path


def modules_ready(directory: Path, modules: Iterable[str]) -> bool:
    return all((directory / "node_modules" / name / "package.json").is_file() for name in modules)


def npm_ci(directory: Path, modules: Iterable[str], needed_by: str) -> None:
    """`npm ci` in `directory` (from its package-lock.json) unless `modules` are installed."""
    modules = list(modules)
    if modules_ready(directory, modules):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is required for {needed_by}")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        check=True,
        timeout=300,
    )
