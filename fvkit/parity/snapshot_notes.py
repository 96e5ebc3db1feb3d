"""Keeps syrupy's "Unused snapshot detection is disabled" note out of the parity suite's summary.

    config.pluginmanager.register(QuietUnusedSnapshotNote(), QUIET_PLUGIN_NAME)

The suite switches syrupy's unused-snapshot detection off on purpose (one run
checks one settings key, so other keys' snapshots are unused by design; see
:func:`fvkit.parity.plugin.keep_unused_snapshots`). syrupy then closes every run
with a warning that this "is not recommended", which tells the user nothing they
can act on. This wrapper drops that one line, and syrupy's section header when
nothing else is left under it; every other syrupy line is written as it was.
"""

from __future__ import annotations

import pytest

QUIET_PLUGIN_NAME = "fvkit-quiet-unused-snapshot-note"
#: The start of syrupy's note (syrupy/report.py), matched as text.
UNUSED_DISABLED_NOTE = "Unused snapshot detection is disabled"
#: syrupy's section header, held back until a line worth showing follows it.
SYRUPY_SECTION = "snapshot report summary"


class QuietUnusedSnapshotNote:
    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        write_line, write_sep = tr.write_line, tr.write_sep
        held = []

        def sep(sepchar, title=None, **kwargs):
            if title is not None and SYRUPY_SECTION in str(title):
                held.append((sepchar, title, kwargs))
                return
            held.clear()   # another section starts: syrupy's ended with nothing worth showing
            write_sep(sepchar, title, **kwargs)

        def line(text, **kwargs):
            if UNUSED_DISABLED_NOTE in str(text):
                return
            if held:
                if not str(text).strip():
                    return
                for sepchar, title, sep_kwargs in held:
                    write_sep(sepchar, title, **sep_kwargs)
                held.clear()
            write_line(text, **kwargs)

        tr.write_sep, tr.write_line = sep, line
        try:
            yield
        finally:
            del tr.write_sep, tr.write_line
