"""Installing fvkit leaves other projects' pytest runs alone (issue 13, item 3).

A throwaway environment is built the way a user's would be: this environment's
packages minus fvkit, then ``pip install -e`` of this checkout. A separate pytest
project in a temporary directory, whose conftest defines ``--device`` and
``--model`` of its own, must run unchanged there (no "conflicting option string",
``--snapshot-update`` not refused, none of the suite's options in its ``--help``),
while this checkout's own runs still have the suite, switched on by its top-level
conftest.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Building the environment (a venv without pip, an editable install) takes a few
#: seconds here; each pytest run in it about two.
SUBPROCESS_TIMEOUT_S = 300

OTHER_CONFTEST = '''
def pytest_addoption(parser):
    parser.addoption("--device", default="cpu")
    parser.addoption("--model", default="their-model")
    parser.addoption("--seed", default="1")
    parser.addoption("--dataset", default="theirs")
'''
OTHER_TEST = '''
def test_their_options(request):
    assert request.config.getoption("--device") == "cuda"
    assert request.config.getoption("--model") == "their-model"
'''


def _is_fvkit_entry(name: str) -> bool:
    low = name.lower()
    return low.startswith("fvkit") or ("fvkit" in low and low.startswith("__editable__")) or low.endswith(".pth")


def run(cmd, cwd, **kwargs):
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, **kwargs)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """A python with this environment's packages except fvkit, and fvkit installed from this checkout."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("installing fvkit from this checkout without a network needs setuptools in this environment")
    base = Path(getattr(sys, "_base_executable", sys.executable))
    root = tmp_path_factory.mktemp("scope")
    made = run([base, "-m", "venv", "--without-pip", root / "venv"], cwd=root)
    if made.returncode:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()[-300:]}")
    python = root / "venv" / "bin" / "python"
    farm = root / "packages"
    farm.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not _is_fvkit_entry(entry.name):
            (farm / entry.name).symlink_to(entry)
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    Path(purelib, "shared_packages.pth").write_text(f"{farm}\n")
    installed = run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                     "-e", REPO], cwd=root)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


def test_pyproject_declares_no_pytest_plugin():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pytest11" not in meta["project"].get("entry-points", {})
    assert "fvkit.parity.switch" in (REPO / "conftest.py").read_text()


def test_installed_fvkit_registers_no_pytest_plugin(fresh_python, tmp_path):
    groups = run([fresh_python, "-c", "import importlib.metadata as m; "
                  "print(sorted({e.group for e in m.distribution('fvkit').entry_points}))"], cwd=tmp_path)
    assert groups.returncode == 0 and "pytest11" not in groups.stdout, groups.stdout + groups.stderr


def test_other_project_keeps_its_own_options(fresh_python, tmp_path):
    (tmp_path / "conftest.py").write_text(OTHER_CONFTEST)
    (tmp_path / "test_theirs.py").write_text(OTHER_TEST)
    result = run([fresh_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda",
                  "--snapshot-update"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
    assert "conflicting option string" not in result.stderr


def test_other_project_help_has_none_of_the_suite(fresh_python, tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    pass\n")
    result = run([fresh_python, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fvkit parity" not in result.stdout
    for flag in ("--model=", "--n-top-heads", "--fixed-trials", "--edit-layer"):
        assert flag not in result.stdout, flag


def test_this_checkout_still_gets_the_suite(fresh_python):
    result = run([fresh_python, "-m", "pytest", "--help", "-p", "no:cacheprovider"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fvkit parity suite" in result.stdout and "--model=NAME" in result.stdout


def test_switch_registers_the_plugin_once(pytester):
    """Where the plugin is already registered (an environment installed from an older
    fvkit, with the entry point), switching it on again is a no-op, not an error."""

    pytester.makeconftest('pytest_plugins = ["fvkit.parity.switch"]\n')
    pytester.makepyfile(test_x="def test_x(request):\n    assert request.config.getoption('fvkit_model') is None\n")
    result = pytester.runpytest("-p", "fvkit.parity.switch")
    result.assert_outcomes(passed=1)
