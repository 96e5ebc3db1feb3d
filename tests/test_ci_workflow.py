"""The hosted-CI workflow (.github/workflows/ci.yml): valid for its service, and the
same model x transformers-release matrix as tox.ini's environments."""

from __future__ import annotations

import configparser
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
#: check-jsonschema's bundled copy of the workflow schema (no network needed).
WORKFLOW_SCHEMA = "vendor.github-workflows"
LINT_TIMEOUT_S = 120


def tox_parity_envs() -> set:
    """The ``{a,b}-{c,d}`` factor products of tox.ini's envlist."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(REPO / "tox.ini")
    envs = set()
    for entry in ini["tox"]["envlist"].split():
        groups = [g.split(",") for g in re.findall(r"\{([^}]*)\}", entry)]
        if groups:
            envs.update("-".join(parts) for parts in itertools.product(*groups))
    return envs


def test_workflow_matrix_is_toxs_model_by_release_matrix():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    matrix = workflow["jobs"]["parity"]["strategy"]["matrix"]
    pairs = {f"{m}-{t}" for m in matrix["model"] for t in matrix["transformers"]}
    assert pairs == tox_parity_envs()
    steps = " ".join(str(step.get("run", "")) for step in workflow["jobs"]["parity"]["steps"])
    assert "tox -e ${{ matrix.model }}-${{ matrix.transformers }}" in steps
    assert "tox -e unit" in " ".join(str(s.get("run", "")) for s in workflow["jobs"]["unit"]["steps"])


def test_workflow_passes_the_workflow_schema_linter():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (the `test` extra) is not installed")
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", WORKFLOW_SCHEMA, str(WORKFLOW)], capture_output=True,
                          text=True, timeout=LINT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_linter_catches_a_broken_workflow(tmp_path):
    """The check above has teeth: a job without runs-on fails it."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (the `test` extra) is not installed")
    broken = yaml.safe_load(WORKFLOW.read_text())
    del broken["jobs"]["unit"]["runs-on"]
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    proc = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", WORKFLOW_SCHEMA, str(path)],
                          capture_output=True, text=True, timeout=LINT_TIMEOUT_S)
    assert proc.returncode != 0 and "runs-on" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
