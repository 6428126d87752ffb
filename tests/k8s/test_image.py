"""The Dockerfile and its upload/context filters, checked statically (no Docker daemon needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, vm

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(op: str) -> list[str]:
    return [i.split(None, 1)[1] for i in INSTRUCTIONS if i.split(None, 1)[0].upper() == op]


def _regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: patterns anchored at the context root, match a path or a parent directory,
    the last matching pattern wins, `!` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        rx = _regex(pattern.strip("/"))
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def gitignored(path: str, patterns: list[str]) -> bool:
    """gitignore-style (.gcloudignore): a pattern without an inner slash matches at any depth."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = (raw[1:] if negate else raw).rstrip("/")
        anchored = "/" in pattern.lstrip("/")
        rx = _regex(pattern.lstrip("/"))
        if anchored:
            hit = any(rx.match("/".join(parts[: n + 1])) for n in range(len(parts)))
        else:
            hit = any(rx.match(part) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def patterns(name: str) -> list[str]:
    text = (REPO_ROOT / name).read_text()
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_base_image_pinned_by_version():
    """One pinned base (python 3.11.x slim bookworm, optionally with a digest) for every stage."""
    (arg,) = [a for a in instructions("ARG") if a.startswith("PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    froms = instructions("FROM")
    assert len(froms) >= 2, "multi-stage: build, then a runtime stage without build leftovers"
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    assert "latest" not in DOCKERFILE


def test_installs_the_project_and_ships_web():
    runs = " ".join(instructions("RUN"))
    assert re.search(r"pip install (--no-cache-dir )?\.(\s|$)", runs), "pip install . (pyproject)"
    copies = instructions("COPY")
    assert any(c.split()[0] == "web" for c in copies), "the demo page/client files (web/)"
    assert any("pyproject.toml" in c for c in copies)
    assert any(c.split()[0] == "services" for c in copies)


def test_web_dir_points_at_the_copied_files():
    """WEB_DIR (read by the socket service) names where `COPY web` put the files."""
    (workdir,) = [w for w in instructions("WORKDIR") if w.startswith("/app")]
    (copy,) = [c for c in instructions("COPY") if c.split()[0] == "web"]
    dest = copy.split()[1]
    web_dir = dest if dest.startswith("/") else f"{workdir}/{dest.removeprefix('./')}"
    envs = " ".join(instructions("ENV"))
    assert re.search(rf"\bWEB_DIR={re.escape(web_dir)}(\s|$)", envs), (web_dir, envs)


def test_runs_as_the_deployments_non_root_user(gke_objs):
    """The image's USER is numeric, non-zero, and the Deployments run as the same uid."""
    (user,) = instructions("USER")
    uid = int(user.split(":")[0])
    assert uid >= 1000
    for name in ("api", "socket"):
        deploy = vm.one(gke_objs, "Deployment", name)
        assert vm.pod_spec(deploy)["securityContext"]["runAsUser"] == uid


def test_two_entrypoints(gke_objs):
    """Both run the same image: `python -m services.api` and `python -m services.socket`."""
    for name in ("api", "socket"):
        deploy = vm.one(gke_objs, "Deployment", name)
        assert vm.container(deploy)["command"] == ["python", "-m", f"services.{name}"]
        package = REPO_ROOT / "services" / name
        if not (package / "__main__.py").exists():
            pytest.skip(f"services/{name}/__main__.py not written yet")


DOCKER_CONTEXT_KEPT = [
    "pyproject.toml",
    "README.md",
    "services/__init__.py",
    "services/api/__main__.py",
    "services/core/settings.py",
    "web/index.html",
    "web/pubsock.js",
]
DOCKER_CONTEXT_DROPPED = [
    ".git/config",
    ".venv/bin/python",
    "tests/unit/test_x.py",
    "bench/results/run.json",
    "services/__pycache__/x.cpython-311.pyc",
    "services/core/__pycache__/settings.cpython-311.pyc",
    "web/node_modules/x/index.js",
    "node_modules/x/index.js",
    "k8s/overlays/gke/params.env",
    "docs/deploy.md",
    ".env",
]


@pytest.mark.parametrize("path", DOCKER_CONTEXT_KEPT)
def test_dockerignore_keeps(path):
    assert not dockerignored(path, patterns(".dockerignore"))


@pytest.mark.parametrize("path", DOCKER_CONTEXT_DROPPED)
def test_dockerignore_drops(path):
    assert dockerignored(path, patterns(".dockerignore"))


@pytest.mark.parametrize("path", ["Dockerfile", ".dockerignore", *DOCKER_CONTEXT_KEPT])
def test_gcloudignore_uploads(path: str):
    """Cloud Build gets what the Dockerfile needs, .dockerignore included."""
    assert not gitignored(path, patterns(".gcloudignore"))


@pytest.mark.parametrize(
    "path",
    [".git/config", ".venv/bin/python", "web/node_modules/x.js", "services/__pycache__/a.pyc"],
)
def test_gcloudignore_skips(path: str):
    assert gitignored(path, patterns(".gcloudignore"))


def test_matchers_self_check():
    """The little matchers above behave like Docker/git on known cases (so the tests mean it)."""
    assert dockerignored("a/b.txt", ["a"])
    assert not dockerignored("a/b.txt", ["*", "!a"])
    assert dockerignored("a/__pycache__/x.pyc", ["*", "!a", "**/__pycache__"])
    assert gitignored("x/y/__pycache__/z.pyc", ["__pycache__/"])
    assert not gitignored("services/x.py", ["tests/"])


def test_dockerfile_exists_at_repo_root():
    assert Path(REPO_ROOT / "Dockerfile").is_file()
