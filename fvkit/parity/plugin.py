"""pytest plugin of the parity suite: options, gate bookkeeping, --fail-fast, report.

    pytest --model tiny-llama --max-trials 1 --n-top-heads 5 --edit-layer 1 --fail-fast
    pytest -n 2                      # xdist: each model's gates stay on one worker

Registered as ``fvkit_parity`` by :mod:`fvkit.parity.switch`, which the
checkout's top-level conftest.py loads (no entry point: other projects' pytest
runs never see it); it only acts on tests
marked ``fvkit_gate`` (the gate modules in ``parity_tests/``). A gate test is
identified by its gate (``@pytest.mark.fvkit_gate("M2")`` on the module) and
its model (``pytest.mark.fvkit_model(name)`` on each parameter); the plugin
orders gate tests model by model, gate by gate, keeps each model on one xdist
worker (:mod:`fvkit.parity.xdist_scheduling`), skips a model's later gates
under ``--fail-fast`` and writes the report (:mod:`fvkit.parity.report`) from
the controller only.
"""

from __future__ import annotations

from typing import Optional

import pytest

from fvkit.errors import SnapshotError
from fvkit.parity.options import ParityOptions, add_options
from fvkit.parity.records import Findings, GateOutcome, RecordError
from fvkit.parity.registry import GATE_TITLES, GateError, gate_def, gate_index
from fvkit.parity.report import IDENTITY_PROP, RESULT_PROP, ReportState, environment

OPTIONS_KEY = pytest.StashKey[ParityOptions]()
REPORT_KEY = pytest.StashKey[ReportState]()
FAILED_KEY = pytest.StashKey[dict]()      # model -> (gate, test) of its first failure, this process
#: Set on a call-phase report whose exception is an error of the suite's own inputs
#: (an unreadable snapshot), not a verdict on fvkit: the report lists the test as ERROR.
SUITE_ERROR_PROP = "fvkit_suite_error"
#: Exceptions that make a gate test an ERROR even when raised while it runs.
SUITE_ERRORS = (SnapshotError,)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fvkit_gate(gate): a parity gate test (M1..M5); set on the gate module")
    config.addinivalue_line("markers", "fvkit_model(name): the model a parity gate test checks")
    config.addinivalue_line("markers", "fvkit_check(what): a gate test that exists only for the models the run "
                                       "checks 'what' on (see ParitySession.not_checked)")
    config.stash[OPTIONS_KEY] = ParityOptions.from_config(config)
    config.stash[REPORT_KEY] = ReportState(config.rootpath, environment=environment, writer=not is_worker(config))
    config.stash[FAILED_KEY] = {}
    if not is_worker(config):
        config.pluginmanager.register(ReportPlugin(config), "fvkit-parity-report")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """(xdist controller) under plain ``-n`` (dist "load"), keep each model's gates on
    one worker: the model is loaded once there and --fail-fast sees its earlier gates."""
    if config.getoption("dist", "no") == "load":
        from fvkit.parity.xdist_scheduling import make_scheduler
        return make_scheduler(config, log)
    return None


def keep_unused_snapshots(config: pytest.Config) -> None:
    """One run checks one settings key, so the snapshots of other settings are
    legitimately unused: syrupy must neither fail on them nor delete them."""
    if hasattr(config.option, "disable_unused_snapshots"):
        config.option.disable_unused_snapshots = True
        from fvkit.parity.snapshot_notes import QUIET_PLUGIN_NAME, QuietUnusedSnapshotNote
        if not config.pluginmanager.has_plugin(QUIET_PLUGIN_NAME):
            # syrupy would close every run with a note about this choice.
            config.pluginmanager.register(QuietUnusedSnapshotNote(), QUIET_PLUGIN_NAME)


def options(config: pytest.Config) -> ParityOptions:
    return config.stash[OPTIONS_KEY]


def report_state(config: pytest.Config) -> ReportState:
    return config.stash[REPORT_KEY]


# --- identity and ordering -------------------------------------------------------------
def gate_identity(item: pytest.Item) -> Optional[dict]:
    gate_mark = item.get_closest_marker("fvkit_gate")
    if gate_mark is None:
        return None
    model_mark = item.get_closest_marker("fvkit_model")
    model = model_mark.args[0] if model_mark and model_mark.args else "-"
    return {"gate": gate_mark.args[0], "model": model, "test": getattr(item, "originalname", item.name)}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    # tryfirst: ordered before -k/-m deselection and other plugins see the items.
    gate_items, others, order = [], [], {}
    for pos, item in enumerate(items):
        ident = gate_identity(item)
        if ident is None:
            others.append(item)
            continue
        try:
            gate_def(ident["gate"])
        except GateError as err:
            raise pytest.UsageError(f"fvkit parity: {item.nodeid} is marked fvkit_gate({ident['gate']!r}): {err}") \
                from None
        item.user_properties.append((IDENTITY_PROP, ident))
        order.setdefault(ident["model"], len(order))
        gate_items.append((order[ident["model"]], gate_index(ident["gate"]), pos, item))
    if gate_items:
        gate_items.sort(key=lambda t: t[:3])
        items[:] = others + [t[3] for t in gate_items]


def pytest_collection_finish(session: pytest.Session) -> None:
    """The gate tests that must report before the report counts as complete (after -k/-m)."""
    state = report_state(session.config)
    state.expected.update(item.nodeid for item in session.items if gate_identity(item) is not None)


# --- --fail-fast -----------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not options(item.config).fail_fast:
        return
    ident = gate_identity(item)
    if ident is None:
        return
    failed = item.config.stash[FAILED_KEY].get(ident["model"])
    if failed and gate_index(failed[0]) < gate_index(ident["gate"]):
        gate, test = failed
        pytest.skip(f"--fail-fast: {ident['model']} failed gate {gate} ({GATE_TITLES.get(gate, gate)}, {test}); "
                    f"its later gates are skipped")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and call.excinfo is not None and call.excinfo.errisinstance(SUITE_ERRORS):
        report.user_properties.append((SUITE_ERROR_PROP, True))
    if report.failed and not hasattr(report, "wasxfail"):
        ident = gate_identity(item)
        if ident is not None:
            item.config.stash[FAILED_KEY].setdefault(ident["model"], (ident["gate"], ident["test"]))


# --- report ----------------------------------------------------------------------------
def _props(report, key: str) -> list:
    return [value for name, value in getattr(report, "user_properties", []) if name == key]


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
        return text[len("Skipped: "):] if text.startswith("Skipped: ") else text
    text = getattr(report, "longreprtext", "") or str(longrepr or "")
    return text.strip()


def _cause(report) -> str:
    """The gate's own message when it failed with one, else the last lines of the traceback."""
    text = _reason(report)
    for prefix in ("Failed: ",):
        if text.startswith(prefix):
            text = text[len(prefix):]
    lines = text.splitlines()
    errors = [ln[2:].strip() for ln in lines if ln.startswith("E ")]
    return "\n".join(errors[-12:]) if errors else "\n".join(lines[-12:])


#: Start of the note a run gets when none of its comparing gates compared anything.
NOTHING_COMPARED = "NO COMPARISON"


def nothing_compared(models: dict) -> str:
    """The note for a run whose comparing gates (M1-M4) compared no reference numbers and
    none passed (every one skipped for lack of them, or failed before comparing); "" when
    something was compared, a gate passed, or no comparing gate ran (``-k spec_resolution``)."""
    tests = [(gate, t) for entry in models.values() for gate, ts in entry["gates"].items()
             if gate in GATE_TITLES and gate_def(gate).compares for t in ts]
    if not tests or any(by_source for _, t in tests for by_source in t.comparisons.values()):
        return ""
    if any(t.status == "PASS" for _, t in tests):
        return ""  # a gate that passes on its own checks (M4's injection guard with void reference numbers)
    gates = sorted({gate for gate, _ in tests}, key=gate_index)
    reasons = sorted({t.cause.splitlines()[0] for _, t in tests if t.status == "SKIP" and t.cause})
    return (f"{NOTHING_COMPARED}: none of the {len(tests)} test(s) of {', '.join(gates)} compared fvkit with "
            f"reference numbers, so this run checked no parity; run with settings that have stored snapshots "
            f"or with --reference-src" + (f" (first skip: {reasons[0]})" if reasons else ""))


class ReportPlugin:
    """Collects gate outcomes on the process that owns the session and writes the report.

        config.pluginmanager.register(ReportPlugin(config), "fvkit-parity-report")
    """

    def __init__(self, config: pytest.Config):
        self.config = config
        self.partial: dict = {}   # nodeid -> GateOutcome being assembled from phase reports

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        idents = _props(report, IDENTITY_PROP)
        if not idents:
            return
        ident = idents[-1]
        outcome = self.partial.get(report.nodeid)
        if outcome is None:
            outcome = self.partial[report.nodeid] = GateOutcome(report.nodeid, ident["model"], ident["gate"],
                                                                ident["test"])
        outcome.seconds += float(getattr(report, "duration", 0.0) or 0.0)
        if report.when == "setup":
            if report.failed:
                outcome.status, outcome.cause = "ERROR", _cause(report)
            elif report.skipped:
                outcome.status, outcome.cause = "SKIP", _reason(report)
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome.status, outcome.cause = "SKIP", f"expected failure: {report.wasxfail or _reason(report)}"
            elif report.failed:
                status = "ERROR" if _props(report, SUITE_ERROR_PROP) else "FAIL"
                outcome.status, outcome.cause = status, _cause(report)
            elif report.skipped:
                outcome.status, outcome.cause = "SKIP", _reason(report)
            else:
                outcome.status = "PASS"
        elif report.when == "teardown":
            if report.failed and outcome.status != "FAIL":
                outcome.status, outcome.cause = "ERROR", _cause(report)
            findings = Findings()
            try:
                for shipped in _props(report, RESULT_PROP):
                    findings.merge(Findings.from_dict(shipped))
            except RecordError as err:
                # Reported as the test's error, not a crash of the whole session.
                outcome.status, outcome.cause = "ERROR", f"its recorded findings cannot be read: {err}"
            outcome.absorb(findings)
            self.partial.pop(report.nodeid, None)
            report_state(self.config).record(outcome, findings)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        state = report_state(self.config)
        if state.models:
            unchecked = nothing_compared(state.models)
            if unchecked:
                state.notes.append(unchecked)
                # A run that compared nothing proved nothing: it must not read as a pass.
                if int(session.exitstatus) == int(pytest.ExitCode.OK):
                    session.exitstatus = exitstatus = pytest.ExitCode.TESTS_FAILED
            stopped = int(exitstatus) in (int(pytest.ExitCode.INTERRUPTED), int(pytest.ExitCode.INTERNAL_ERROR))
            state.finish(int(exitstatus), interrupted=stopped or bool(session.shouldstop))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    if is_worker(config):
        return
    state = report_state(config)
    lines = state.table_lines()
    if not lines:
        return
    tr = terminalreporter
    title = f"fvkit parity: {state.dataset} / {state.trials_id}"
    tr.write_sep("=", title)
    for note in state.notes:
        tr.write_line(f"note: {note}", red=note.startswith(NOTHING_COMPARED))
    for line in lines:
        tr.write_line(line)
    if state.paths_written:
        tr.write_line("written:" + ("" if state.complete else " (report marked incomplete)"))
        for path in state.paths_written:
            tr.write_line(f"  {path}")
    if state.top_level_kept:
        tr.write_line(state.top_level_kept)
