"""The parity suite's runs end without syrupy's "Unused snapshot detection is disabled" note."""

import pytest

from fvkit.parity.snapshot_notes import UNUSED_DISABLED_NOTE

CONFTEST = '''
import pytest
from fvkit.parity.plugin import keep_unused_snapshots

def pytest_configure(config):
    keep_unused_snapshots(config)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    # A later section, as the parity suite's own summary table is.
    terminalreporter.write_sep("=", "later section")
    terminalreporter.write_line("later line")
'''


@pytest.mark.parametrize("quiet", [True, False])
def test_unused_snapshot_note_is_dropped(pytester, quiet):
    conftest = CONFTEST if quiet else CONFTEST.replace("keep_unused_snapshots(config)",
                                                       "config.option.disable_unused_snapshots = True")
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_snap="def test_snap(snapshot):\n    assert 1 == 1\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    # Without the wrapper syrupy prints the note (the check has something to catch).
    assert (UNUSED_DISABLED_NOTE in out) is not quiet
    assert ("snapshot report summary" in out) is not quiet
    assert "later section" in out and "later line" in out
