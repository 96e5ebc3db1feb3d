"""The parity suite's report: JSON, CSV and log, rewritten after every test.

    state = ReportState(rootdir, environment=environment())
    state.bind(dataset="antonym", trials_id="fixed_trials_antonym_t10_s10_seed0", settings={...})
    state.record(test_outcome)     # after each test; rewrites this run's files atomically
    state.finish(exitstatus)       # marks the report complete (or not)

Each session keeps its own report, which no later run touches, in
``results_fv/<dataset>/<fixed_trials_id>/runs/<start time>/``, rewritten as tests
report. The same files in ``results_fv/<dataset>/<fixed_trials_id>/`` hold the
latest COMPLETE run (merged with any session running at the same time, see
:mod:`fvkit.parity.report_folder`): they are replaced only when the merged
report is complete, so a running, interrupted or incomplete session leaves the
previous complete report there byte for byte.

* ``parity_suite_report.json``: per model and gate the status (PASS, FAIL,
  SKIP, ERROR), metrics (drifts), tolerances, timings and cause of failure, plus
  the environment and ``"complete"`` (false in a run's own copy until the session
  ends normally, so an interrupted run never looks finished);
* ``parity_suite_stages.csv``: one row per model and stage;
* ``parity_suite.log``: one line per test outcome, as it happens, followed by the
  whole cause of a failure (indented) and, on M5 lines, the spec checked;
* ``parity_suite_report.html``: the same report as one self-contained page,
  with each model's indirect-effect heatmap, layer sweep (``--edit-layer all``)
  and decoded function vector (:mod:`fvkit.report.page`).

Only the process that owns the session writes (the xdist controller, never a
worker); workers ship their data in each test report's ``user_properties``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import platform
from dataclasses import replace
from pathlib import Path
from typing import Optional

from fvkit.parity.records import (  # noqa: F401  (GateOutcome, worst_status: the report's records, re-exported)
    STAGE_COLUMNS,
    STATUS_ORDER,
    Findings,
    GateOutcome,
    StageRow,
    worst_status,
)
from fvkit.parity.records import NOT_COMPARED, tie_resolved_text
from fvkit.parity.registry import GATES


REPORT_NAME = "parity_suite_report.json"
STAGES_NAME = "parity_suite_stages.csv"
LOG_NAME = "parity_suite.log"
#: Folder (under the report directory) holding one folder per run, named by its start time.
RUNS_DIR = "runs"
FORMAT = "fvkit-parity-report/1"
#: Key of the user property carrying a gate test's identity (set at collection).
IDENTITY_PROP = "fvkit_gate"
#: Key of user properties carrying a gate test's findings (set while it runs).
RESULT_PROP = "fvkit_result"


def environment() -> dict:
    """Versions that decide the numbers; the reference's own come from its runs."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("fvkit", "torch", "transformers", "numpy", "pytest", "syrupy", "xdist"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is simply not listed
            continue
    return versions


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def log_entry(outcome: "GateOutcome") -> str:
    """A test's log line; a failure's whole cause follows on indented lines, and an
    M5 line names the spec it checked (its test id is ``[spec:model]``)."""
    line = f"{now()} {outcome.status:<5} {outcome.model} {outcome.gate}"
    spec = m5_spec(outcome)
    if spec:
        line += f" spec {spec}"
    line += f" {outcome.test} ({outcome.seconds:.2f}s)"
    ties = sum(c.tie_count for by_source in outcome.comparisons.values() for c in by_source.values())
    if ties:
        line += f" [{tie_resolved_text(ties)}]"
    noise = [d for by_source in outcome.comparisons.values() for c in by_source.values() for d in c.drifts
             if d.noise_level and not d.problem]
    if noise:
        line += "".join(f" [{d.stage} vs {d.source}: {d.noise_text()}]" for d in noise)
    if outcome.cause:
        line += "".join(f"\n    {text}" for text in outcome.cause.splitlines())
    line += "".join(f"\n    {text}" for text in comparison_lines(outcome))
    return line


def comparison_lines(outcome: "GateOutcome") -> list:
    """What a test compared against each source, where the reference could not compute some
    stage: those stages are listed as NOT COMPARED with the reason, never as passes."""
    lines = []
    for by_source in outcome.comparisons.values():
        for source, check in by_source.items():
            if not check.not_compared:
                continue
            compared = [d.stage for d in check.drifts] + [s for s in check.compared if s not in
                                                           {d.stage for d in check.drifts}]
            lines.append(f"compared with the {source}: {', '.join(compared) or 'nothing'}")
            lines.extend(f"{NOT_COMPARED} {stage}: {why}" for stage, why in check.not_compared.items())
    return lines


def m5_spec(outcome: "GateOutcome") -> Optional[str]:
    """The spec an M5 test checked, from its parameter id ``spec:model``."""
    from fvkit.parity.registry import param_id_of_nodeid, spec_of_param_id

    param = param_id_of_nodeid(outcome.nodeid) if outcome.gate == "M5" else None
    return spec_of_param_id(param) if param else None


class ReportState:
    """Everything the report files hold, kept in ``config.stash`` for one session.

        state = ReportState(Path("."))
        state.bind("antonym", "fixed_trials_antonym_t10_s10_seed0", {"max_trials": 1})
        state.record(outcome); state.finish(0)
    """

    def __init__(self, rootdir: Path, environment=None, writer: bool = True):
        self.rootdir = Path(rootdir)
        self.writer = writer
        # A dict, or a function giving one: versions are only looked up (torch and
        # transformers imported) once there is something to report.
        self._environment = environment
        self.dataset: Optional[str] = None
        self.trials_id: Optional[str] = None
        self.settings: dict = {}
        self.notes: list = []
        self.models: dict = {}       # model -> {"settings", "timings", "reference", "gates": {gate: [GateOutcome]}}
        self.pages: dict = {}        # model -> packed figures/tokens for the HTML page (latest wins)
        self.expected: set = set()   # node ids of gate tests that should report
        self.started = now()
        self.finished: Optional[str] = None
        self.complete = False
        self.exit_status: Optional[int] = None
        self._log_lines: list = []
        self._run_dir: Optional[Path] = None
        self.paths_written: list = []
        #: Why the last write left the top-level files as they were (None once it rewrote them).
        self.top_level_kept: Optional[str] = None
        self._folder = None          # fvkit.parity.report_folder.ReportFolder, made on the first write

    @property
    def environment(self) -> dict:
        if callable(self._environment):
            self._environment = self._environment()
        if self._environment is None:
            self._environment = {}
        return self._environment

    # --- setup ---------------------------------------------------------------------------
    def bind(self, dataset: str, trials_id: str, settings: dict, notes=()) -> None:
        self.dataset, self.trials_id, self.settings = dataset, trials_id, dict(settings)
        for note in notes:
            if note not in self.notes:
                self.notes.append(note)

    @property
    def out_dir(self) -> Optional[Path]:
        if not (self.dataset and self.trials_id):
            return None
        return self.rootdir / "results_fv" / self.dataset / self.trials_id

    @property
    def run_dir(self) -> Optional[Path]:
        """This run's own folder, ``<out_dir>/runs/<start time>``, made on first use (a
        suffix keeps two runs started in the same second apart)."""
        if self._run_dir is None and self.out_dir is not None and self.writer:
            stamp = self.started[:19].replace("-", "").replace(":", "")
            runs = self.out_dir / RUNS_DIR
            runs.mkdir(parents=True, exist_ok=True)
            for n in range(1, 10_000):
                candidate = runs / (stamp if n == 1 else f"{stamp}-{n}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                self._run_dir = candidate
                break
        return self._run_dir

    # --- updates -------------------------------------------------------------------------
    def model_entry(self, model: str) -> dict:
        return self.models.setdefault(model, {"settings": {}, "timings": {}, "reference": {}, "gates": {}})

    def record(self, outcome: GateOutcome, findings: Optional[Findings] = None) -> None:
        """File a finished test; ``findings`` carries its model-wide settings, timings,
        reference environment and page entry (its own measurements are in ``outcome``)."""
        entry = self.model_entry(outcome.model)
        tests = entry["gates"].setdefault(outcome.gate, [])
        tests[:] = [t for t in tests if t.nodeid != outcome.nodeid] + [outcome]
        findings = findings or Findings()
        entry["settings"].update(findings.settings)
        entry["timings"].update(findings.timings)
        release = findings.reference.get("reference_transformers")
        if release and entry["reference"].get("reference_transformers") != release:
            self.log(f"{now()} {outcome.model}: reference numbers from transformers {release}")
        entry["reference"].update(findings.reference)
        if findings.page is not None:
            self.pages[outcome.model] = findings.page
        self.log(log_entry(outcome))
        self.write()

    def log(self, line: str) -> None:
        # Kept in memory and written with the other files by write(): a session that
        # records nothing (one stopped by a bad option) never rewrites an earlier log.
        self._log_lines.append(line)

    def finish(self, exit_status: int, interrupted: bool) -> None:
        self.exit_status = int(exit_status)
        self.finished = now()
        reported = {t.nodeid for e in self.models.values() for ts in e["gates"].values() for t in ts}
        missing = sorted(self.expected - reported)
        self.complete = not interrupted and not missing
        if missing:
            self.notes.append(f"{len(missing)} gate test(s) never reported, e.g. {missing[0]}")
        self.log(f"{now()} session finished: exit status {exit_status}, complete={str(self.complete).lower()}")
        self.write()

    # --- views ---------------------------------------------------------------------------
    def model_order(self) -> list:
        """The run's --model order first, then models only a spec check used, as they came."""
        listed = [m for m in self.settings.get("models", []) if m in self.models]
        return listed + [m for m in self.models if m not in listed]

    def gate_status(self, model: str, gate: str) -> Optional[str]:
        tests = self.models.get(model, {}).get("gates", {}).get(gate)
        return worst_status(t.status for t in tests) if tests else None

    def as_dict(self) -> dict:
        from fvkit.parity.tolerances import TOLERANCES

        models = {}
        for name in self.model_order():
            entry = self.models[name]
            gates = {}
            for gate in sorted(entry["gates"]):
                tests = entry["gates"][gate]
                causes = [f"{t.test}: {t.cause}" for t in tests if t.cause and t.status != "PASS"]
                gates[gate] = {
                    "status": worst_status(t.status for t in tests),
                    "seconds": round(sum(t.seconds for t in tests), 4),
                    "tests": [t.as_dict() for t in tests],
                    **({"cause": "\n".join(causes)} if causes else {}),
                }
            models[name] = {"settings": entry["settings"], "stage_timings": entry["timings"],
                            "reference": entry["reference"], "gates": gates}
        return {
            "format": FORMAT,
            "complete": self.complete,
            "exit_status": self.exit_status,
            "started": self.started,
            "finished": self.finished,
            "dataset": self.dataset,
            "fixed_trials_id": self.trials_id,
            "settings": self.settings,
            "notes": self.notes,
            "tolerances": TOLERANCES,
            "environment": self.environment,
            "summary": {m: {g: self.gate_status(m, g) for g in sorted(self.models[m]["gates"])}
                        for m in self.model_order()},
            "models": models,
        }

    def stage_rows(self) -> list:
        """Every row of the stages CSV (StageRow), model by model, gate by gate."""
        return [replace(row, reference_transformers=self.models[model]["reference"].get("reference_transformers") or "")
                for model in self.model_order() for gate in sorted(self.models[model]["gates"])
                for t in self.models[model]["gates"][gate] for row in t.csv_rows()]

    def write(self) -> None:
        if not self.writer or not self.out_dir or not self.models:
            return
        # Imported here, not at start-up: the plugin module is loaded by every pytest run.
        from fvkit.parity.report_folder import ReportFolder, session_id
        from fvkit.report.page import HTML_NAME, render_html, unpack_entry

        if self._folder is None or self._folder.out_dir != self.out_dir:
            self._folder = ReportFolder(self.out_dir, session_id())
        with self._folder.locked() as folder:
            # Concurrent sessions on the same folder: each stages its own data and the
            # shared files are the union (fvkit.parity.report_folder).
            folder.stage(self.as_dict(), [row.as_dict() for row in self.stage_rows()], self.pages, self._log_lines)
            merged = folder.merged()
            # The top level only ever holds a complete report: while this or any merged
            # session is still running, or when one was interrupted, it keeps the previous
            # complete one byte for byte; progress shows in this run's own folder.
            written = []
            if merged.report.get("complete"):
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=STAGE_COLUMNS, lineterminator="\n")
                writer.writeheader()
                for row in merged.rows:
                    writer.writerow(StageRow.from_dict(row).as_csv())
                written = folder.replace({
                    REPORT_NAME: json.dumps(merged.report, indent=1, default=str) + "\n",
                    STAGES_NAME: buf.getvalue(),
                    HTML_NAME: render_html(merged.report, {m: unpack_entry(p) for m, p in merged.pages.items()}),
                    LOG_NAME: "\n".join(merged.log) + "\n",
                })
                self.top_level_kept = None
            else:
                self.top_level_kept = self._kept_reason()
        for path in written:
            if path not in self.paths_written:
                self.paths_written.append(path)
        self.write_own_run(html=render_html(self.as_dict(), {m: unpack_entry(p) for m, p in self.pages.items()}))

    def _kept_reason(self) -> str:
        """One line for the terminal: why the top level was not rewritten, and what it holds."""
        where = self.out_dir
        holds = ("keeps the previous complete report" if (where / REPORT_NAME).is_file()
                 else "has no complete report yet")
        if not self.complete:
            why = "this run is incomplete" + (" (interrupted or a gate never reported)" if self.finished else "")
        else:
            why = "another session sharing it is still running or was interrupted; it is written once all complete"
        return f"top level {where} unchanged: {why}; it {holds}"

    def write_own_run(self, html: str) -> None:
        """This session's own files, unmerged, in ``runs/<start time>/``: a later run
        rewrites the shared files above, never this folder."""
        from fvkit.method.data import atomic_write_text
        from fvkit.report.page import HTML_NAME

        out = self.run_dir
        if out is None:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=STAGE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.stage_rows():
            writer.writerow(row.as_csv())
        files = {REPORT_NAME: json.dumps(self.as_dict(), indent=1, default=str) + "\n", STAGES_NAME: buf.getvalue(),
                 HTML_NAME: html, LOG_NAME: "\n".join(self._log_lines) + "\n"}
        for name, text in files.items():
            atomic_write_text(out / name, text)
            if out / name not in self.paths_written:
                self.paths_written.append(out / name)

    # --- terminal ------------------------------------------------------------------------
    def table_lines(self) -> list:
        if not self.models:
            return []
        width = max(len("model"), *(len(m) for m in self.models))
        lines = [f"{'model':<{width}}  " + "  ".join(f"{g:<5}" for g in GATES)]
        for model in self.model_order():
            cells = [self.gate_status(model, g) or "-" for g in GATES]
            lines.append(f"{model:<{width}}  " + "  ".join(f"{c:<5}" for c in cells))
        return lines
