"""The manifest schemas are part of the checkout, and a missing one fails instead of skipping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import vm


def test_index_names_exactly_the_schema_files() -> None:
    """Every file index.json names is in k8s/schemas, and every schema there is in the index."""
    index = json.loads((vm.SCHEMA_DIR / "index.json").read_text())
    files = {p.name for p in vm.SCHEMA_DIR.glob("*.json")} - {"index.json"}
    assert set(index.values()) == files


def test_readme_gives_each_schema_a_source() -> None:
    """The README's table names every schema file (where it came from and its version)."""
    readme = (vm.SCHEMA_DIR / "README.md").read_text()
    index = json.loads((vm.SCHEMA_DIR / "index.json").read_text())
    for name in index.values():
        assert f"| `{name}` |" in readme, name


def test_index_covers_every_rendered_kind(
    base_objs: list[dict[str, Any]], gke_objs: list[dict[str, Any]], schema_root: Path
) -> None:
    """No rendered apiVersion/kind lacks a schema (NO SCHEMA would fail the schema tests)."""
    index = json.loads((schema_root / "index.json").read_text())
    kinds = {f"{o['apiVersion']}/{o['kind']}" for o in base_objs + gke_objs}
    assert kinds <= set(index)


@pytest.fixture
def schema_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "schemas"
    shutil.copytree(vm.SCHEMA_DIR, copy)
    return copy


def test_a_missing_schema_file_fails(schema_copy: Path, gke_objs: list[dict[str, Any]]) -> None:
    """Without one file, the fixture's check raises and validation reports the kind."""
    (schema_copy / "deployment-apps-v1.json").unlink()
    with pytest.raises(vm.SchemaMissing, match=r"deployment-apps-v1\.json"):
        vm.require_schemas(schema_copy)
    problems = vm.schema_problems(gke_objs, schema_copy)
    assert any(p.startswith("NO SCHEMA  apps/v1/Deployment") for p in problems), problems


def test_a_missing_index_fails(schema_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without index.json: SchemaMissing in the tests, exit 2 from the command line."""
    (schema_copy / "index.json").unlink()
    with pytest.raises(vm.SchemaMissing, match="no schema index"):
        vm.require_schemas(schema_copy)
    assert vm.main(["--schemas", str(schema_copy), "-"]) == 2
    assert "no schema index" in capsys.readouterr().err
