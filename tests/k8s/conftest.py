"""Fixtures for the offline manifest tests: the validator module, rendered manifests, the schemas.

Nothing here needs a cluster or the network: `kubectl kustomize` renders offline, the schemas are
the files in k8s/schemas (a missing one fails the tests, never skips them), and deploy.sh runs
with DRY_RUN=1 against fake gcloud/kubectl.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_validator() -> ModuleType:
    path = REPO_ROOT / "scripts" / "validate_manifests.py"
    spec = importlib.util.spec_from_file_location("pubsock_validate_manifests", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vm = _load_validator()


@pytest.fixture(scope="session")
def validator() -> ModuleType:
    return vm


@pytest.fixture(scope="session")
def schema_root() -> Path:
    """k8s/schemas, complete; a missing index or file raises (an error, not a skip)."""
    return vm.require_schemas()


@pytest.fixture(scope="session")
def kubectl() -> str:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl not on PATH: it renders the kustomize overlays (kubectl kustomize)")
    return binary


@pytest.fixture(scope="session")
def _base(kubectl: str) -> list[dict]:
    return vm.render(vm.BASE_DIR)


@pytest.fixture(scope="session")
def _gke(kubectl: str) -> list[dict]:
    # Always the committed example values, whatever a local deploy left in params.env.
    return vm.render(vm.GKE_DIR, use_example_params=True)


@pytest.fixture
def base_objs(_base: list[dict]) -> list[dict]:
    return copy.deepcopy(_base)


@pytest.fixture
def gke_objs(_gke: list[dict]) -> list[dict]:
    return copy.deepcopy(_gke)
