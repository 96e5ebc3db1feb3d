"""Broken inputs of the suite are errors, never skips: an unreadable snapshot is an ERROR
naming its file (fvkit.parity.snapshots, fvkit.parity.plugin), and an ImportError from
fvkit's own fast indirect-effect path fails M3 (parity_tests/test_m3_indirect_effect.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fvkit.errors import SnapshotError
from fvkit.parity.report import REPORT_NAME
from fvkit.parity.snapshots import FORMAT, SnapshotBook

from synthetic_suite import REAL_CACHE, SYNTH_CONFTEST, SYNTH_DIR


def book_at(monkeypatch, path: Path) -> SnapshotBook:
    book = SnapshotBook.__new__(SnapshotBook)
    book.gate, book.key = "M2", "k"
    monkeypatch.setattr(SnapshotBook, "path", property(lambda self: path))
    return book


@pytest.mark.parametrize("text,said", [
    ('{"format": "fvkit-parity-snapshot/1", "value": [1.0, ', "is not valid JSON"),
    ('{"format": "something-else/9", "value": {}}', "is not a fvkit parity snapshot (format 'something-else/9'"),
    ("[1, 2]", "is not a fvkit parity snapshot (format 'list'"),
    (b"\xff\xfe\x00bad", "cannot be read"),
])
def test_a_corrupt_snapshot_raises_an_error_naming_the_file(tmp_path, monkeypatch, text, said):
    path = tmp_path / "test_mean_activations[tiny][k].json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SnapshotError) as err:
        book_at(monkeypatch, path).load()
    assert str(path) in str(err.value) and said in str(err.value) and "--snapshot-update" in str(err.value)


def test_an_unreadable_snapshot_raises_an_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "snap.json"
    path.mkdir()  # there, but reading it fails
    monkeypatch.setattr(SnapshotBook, "exists", lambda self: True)
    with pytest.raises(SnapshotError, match="cannot be read"):
        book_at(monkeypatch, path).load()


def test_a_good_snapshot_and_a_missing_one_still_load(tmp_path, monkeypatch):
    path = tmp_path / "snap.json"
    assert book_at(monkeypatch, path).load() is None
    path.write_text(json.dumps({"format": FORMAT, "value": {"mean_activations": [1.0]}}))
    assert book_at(monkeypatch, path).load()["value"] == {"mean_activations": [1.0]}


SNAPSHOT_ERROR_GATE = '''
import pytest
from fvkit.errors import SnapshotError
from fvkit.models import zoo

pytestmark = pytest.mark.fvkit_gate("M2")

@pytest.mark.parametrize("model", [pytest.param("alpha", id="alpha", marks=pytest.mark.fvkit_model("alpha"))])
def test_mean_activations(model):
    raise SnapshotError("snapshot /x/test_mean_activations[alpha][k].json is not valid JSON (boom)")
'''


def test_a_snapshot_error_makes_the_gate_test_an_error_in_the_report(pytester, monkeypatch):
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    pytester.makeconftest(SYNTH_CONFTEST)
    pytester.makepyfile(test_gate_m2=SNAPSHOT_ERROR_GATE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    report = json.loads((pytester.path / SYNTH_DIR / REPORT_NAME).read_text())
    assert report["summary"]["alpha"] == {"M2": "ERROR"}
    test = report["models"]["alpha"]["gates"]["M2"]["tests"][0]
    assert test["status"] == "ERROR" and "test_mean_activations[alpha][k].json is not valid JSON" in test["cause"]


BREAK_FAST_PATH = '''
"""Makes fvkit's fast indirect-effect path fail to import (loaded with -p)."""
from fvkit.parity.session import ParitySession

_real = ParitySession.indirect_effect

def _broken(self, name, mode):
    if mode == "fast":
        raise ImportError("cannot import name 'replay_heads' from 'fvkit.fast.replay'")
    return _real(self, name, mode)

ParitySession.indirect_effect = _broken
'''


def test_an_import_error_of_the_fast_path_fails_m3_and_a_corrupt_snapshot_errors_m2(pytester, monkeypatch):
    """Both on the real gates, in one subprocess run of tiny-gpt2 with the quick settings."""
    from test_parity_plugin import QUICK, REPO

    import shutil
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(REPO / "parity_tests", pytester.path / "parity_tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pytest.ini", "conftest.py"):
        shutil.copy(REPO / name, pytester.path / name)
    pytester.makepyfile(break_fast_path=BREAK_FAST_PATH)
    snap = next((pytester.path / "parity_tests/__snapshots__/test_m2_mean_activations").glob(
        "test_mean_activations[[]tiny-gpt2[]]*present-past*mt1-nh5-el1*.json"))
    snap.write_text(snap.read_text()[:200])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess("parity_tests", "--data-dir", str(REPO / "datasets"), "-p", "no:cacheprovider",
                                           "-p", "break_fast_path", "--model", "tiny-gpt2", *QUICK,
                                           "-k", "mean_activations or indirect_effect_fast", timeout=900)
    out = result.stdout.str()
    result.assert_outcomes(failed=2)
    assert "fvkit's fast indirect-effect path failed to import: ImportError: cannot import name 'replay_heads'" in out
    report = json.loads(next(pytester.path.glob(f"results_fv/present-past/*/{REPORT_NAME}")).read_text())
    gates = report["models"]["tiny-gpt2"]["gates"]
    assert gates["M2"]["status"] == "ERROR" and snap.name in gates["M2"]["cause"]
    assert gates["M3"]["status"] == "FAIL"
