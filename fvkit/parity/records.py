"""Typed records of the parity report, from a gate's comparison to the page.

    check = compare_gate("M2", ours, ref, "snapshot")     # a Comparison of DriftRecords / MismatchRecords
    rows = check.stage_rows(gate_def("M2").exact_stages_of(("mean_activations",)))   # StageRows
    Recorder(item).add(comparisons={"M2": {"snapshot": check}}, stage_rows=rows)   # a Findings
    outcome = GateOutcome(nodeid, "tiny-llama", "M2", "test_mean_activations")
    outcome.absorb(Findings.from_dict(shipped))            # the plugin, once per test report

One shape per thing, written by ``as_dict`` and read back by ``from_dict``: the
report JSON is ``GateOutcome.as_dict``, the CSV ``StageRow.as_csv``, and the
page reads a JSON report back through :meth:`GateOutcome.from_dict`. Findings
cross xdist as plain dicts (``user_properties`` must be serialisable), so
:class:`Findings` converts at both ends. An unknown field is an error, never a
silently dropped column; empty values are kept as given.

Torch-free: the page and the plugin import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from typing import Optional

from fvkit.errors import FvkitError
from fvkit.parity.registry import is_check_key

#: Longest repr of a mismatching value kept in messages and the report.
SHORT_REPR_CHARS = 160
#: Statuses of a gate test, worst first (see :func:`worst_status`).
STATUS_ORDER = ("ERROR", "FAIL", "PASS", "SKIP")
#: A stage row's status where the reference declared it cannot compute the stage: the
#: stage was left out of the comparison, which is neither a pass nor a failure.
NOT_COMPARED = "NOT COMPARED"


class RecordError(FvkitError):
    """Report data that does not have the shape of its record."""


def short(value, limit: int = SHORT_REPR_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters so one long list cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _known(cls, data: dict, what: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{what} has unknown field(s) {', '.join(unknown)}; {cls.__name__} holds "
                          f"{', '.join(f.name for f in fields(cls))} (fvkit/parity/records.py)")
    return data


# --- one stage's comparison ---------------------------------------------------------------
@dataclass
class DriftRecord:
    """How far one stage's tensor is from the reference's (see :func:`fvkit.parity.drift.tensor_drift`).

        d.ok, d.rel_drift, d.worst_index, d.message()
    """

    stage: str
    tol: float
    tol_name: str
    max_abs_drift: float = 0.0
    rel_drift: float = 0.0
    ref_scale: float = 0.0
    worst_index: Optional[tuple] = None
    ours_at_worst: Optional[float] = None
    ref_at_worst: Optional[float] = None
    shape_ours: tuple = ()
    shape_ref: tuple = ()
    problem: str = ""  # shape mismatch or non-finite values: not a drift at all
    source: str = "reference"
    floor: float = 0.0      # absolute drift that always passes (fvkit.parity.tolerances.ABS_FLOORS)
    floor_name: str = ""

    @property
    def allowed(self) -> float:
        """The largest absolute drift that passes: the relative tolerance of the largest
        |reference| entry, or the absolute floor where that is larger."""
        return max(self.tol * self.ref_scale, self.floor)

    @property
    def noise_level(self) -> bool:
        """Whether the reference's values are so small that the absolute floor, not the
        relative tolerance, decides: the comparison is at float32 noise level."""
        return self.floor > self.tol * self.ref_scale

    @property
    def share(self) -> float:
        """The drift as a fraction of what is allowed (above 1 fails)."""
        if self.noise_level:
            return self.max_abs_drift / self.floor
        return self.rel_drift / self.tol if self.tol > 0 else (0.0 if self.rel_drift == 0 else float("inf"))

    @property
    def ok(self) -> bool:
        if self.problem:
            return False
        return self.rel_drift <= self.tol or (self.noise_level and self.max_abs_drift <= self.floor)

    def noise_text(self) -> str:
        """How a noise-level comparison is described in the CSV, the log, the page and messages."""
        return (f"noise level: the largest |reference| entry {self.ref_scale:.3g} is below "
                f"{self.floor_name}/{self.tol_name} = {self.floor / self.tol:.3g}, where {self.tol_name} of it would "
                f"ask for less than float32 resolves; compared with the absolute floor "
                f"{self.floor_name}={self.floor:g}")

    def as_dict(self) -> dict:
        """The report's drift entry (``problem`` only when there is one)."""
        return {
            "stage": self.stage,
            "source": self.source,
            "max_abs_drift": self.max_abs_drift,
            "rel_drift": self.rel_drift,
            "ref_max_abs": self.ref_scale,
            "tolerance": self.tol,
            "tolerance_name": self.tol_name,
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
            "shape": list(self.shape_ours),
            "ok": self.ok,
            **({"problem": self.problem} if self.problem else {}),
            **({"abs_floor": self.floor, "abs_floor_name": self.floor_name, "noise_level": self.noise_level}
               if self.floor_name else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DriftRecord":
        """A drift read back from the report (the values at the worst index are not stored there)."""
        index = data.get("worst_index")
        shape = tuple(data.get("shape") or ())
        return cls(stage=data["stage"], tol=data["tolerance"], tol_name=data["tolerance_name"],
                   max_abs_drift=data["max_abs_drift"], rel_drift=data["rel_drift"], ref_scale=data["ref_max_abs"],
                   worst_index=tuple(index) if index is not None else None, shape_ours=shape, shape_ref=shape,
                   problem=data.get("problem", ""), source=data["source"], floor=data.get("abs_floor", 0.0),
                   floor_name=data.get("abs_floor_name", ""))

    def message(self) -> str:
        head = f"{self.stage} vs {self.source}"
        if self.problem:
            return f"{head}: {self.problem}"
        verdict = "within" if self.ok else "exceeds"
        where = (f"at index {list(self.worst_index) if self.worst_index is not None else '-'} "
                 f"(fvkit {self.ours_at_worst!r}, reference {self.ref_at_worst!r})")
        if self.noise_level:
            return (f"{head}: {self.noise_text()}; max abs drift {self.max_abs_drift:.3e} {verdict} "
                    f"{self.floor_name}={self.floor:g} {where}")
        return (
            f"{head}: drift {self.rel_drift:.3e} of the largest |reference| entry ({self.ref_scale:.4g}) "
            f"{verdict} tolerance {self.tol_name}={self.tol:g}; max abs drift {self.max_abs_drift:.3e} {where}"
        )

    def stage_row(self, suffix: str = "") -> "StageRow":
        """The CSV row; at noise level its tolerance is the absolute floor, and the detail says so."""
        noise = self.noise_level and not self.problem
        return StageRow(stage=self.stage + suffix, source=self.source, status="PASS" if self.ok else "FAIL",
                        max_abs_drift=self.max_abs_drift, rel_drift=self.rel_drift,
                        tolerance=self.floor if noise else self.tol,
                        tolerance_name=self.floor_name if noise else self.tol_name,
                        worst_index=list(self.worst_index) if self.worst_index is not None else "",
                        detail=self.problem or (self.noise_text() if noise else ""))


@dataclass
class MismatchRecord:
    """The first place two exact-match structures differ, with the values shown shortened.

        MismatchRecord.of("prompts[1]", "b", "c")             # path, fvkit's value, the reference's
        MismatchRecord.of(...).at("m1.prompts", cause="prompt text ...")
    """

    path: str
    fvkit: str
    reference: str
    stage: str = ""
    cause: str = ""

    @classmethod
    def of(cls, path: str, ours, ref) -> "MismatchRecord":
        return cls(path, short(ours), short(ref))

    def at(self, stage: str, cause: str = "") -> "MismatchRecord":
        """The same mismatch, filed under a comparison stage with its likely cause."""
        return replace(self, stage=stage, cause=cause)

    def message(self) -> str:
        return f"{self.path}: fvkit {self.fvkit} != reference {self.reference}"

    def explained(self) -> str:
        return self.message() + (f" [cause: {self.cause}]" if self.cause else "")

    def as_dict(self) -> dict:
        return {"stage": self.stage, "path": self.path, "fvkit": self.fvkit, "reference": self.reference,
                "cause": self.cause}

    @classmethod
    def from_dict(cls, data: dict) -> "MismatchRecord":
        return cls(**_known(cls, data, "a mismatch entry"))


# --- one gate against one source ----------------------------------------------------------
@dataclass
class Comparison:
    """All findings of one gate against one reference source.

        check = Comparison("M2", "snapshot")
        check.drifts.append(tensor_drift(...)); check.ok; check.failures()
    """

    gate: str
    source: str
    drifts: list = field(default_factory=list)       # DriftRecord
    mismatches: list = field(default_factory=list)   # MismatchRecord, each with its stage
    notes: list = field(default_factory=list)
    compared: list = field(default_factory=list)     # exactly compared stages both sides produced
    not_compared: dict = field(default_factory=dict)  # stage -> why it was left out (declared by the reference)
    tie_resolved: dict = field(default_factory=dict)  # stage -> ranks taken from the reference at a float tie

    @property
    def tie_count(self) -> int:
        return sum(self.tie_resolved.values())

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.drifts) and not self.mismatches

    def failures(self) -> list:
        out = [d.message() for d in self.drifts if not d.ok]
        out.extend(f"{m.stage} vs {self.source}: {m.explained()}" for m in self.mismatches)
        return out

    def as_dict(self) -> dict:
        """The report's entry for this source (``notes`` only when there are some)."""
        return {
            "source": self.source,
            "ok": self.ok,
            "drifts": [d.as_dict() for d in self.drifts],
            "mismatches": [m.as_dict() for m in self.mismatches],
            "compared": list(self.compared),
            **({"not_compared": dict(self.not_compared)} if self.not_compared else {}),
            **({"tie_resolved": dict(self.tie_resolved)} if self.tie_resolved else {}),
            **({"notes": self.notes} if self.notes else {}),
        }

    @classmethod
    def from_dict(cls, gate: str, data: dict) -> "Comparison":
        return cls(gate, data["source"], [DriftRecord.from_dict(d) for d in data.get("drifts") or []],
                   [MismatchRecord.from_dict(m) for m in data.get("mismatches") or []], list(data.get("notes") or []),
                   list(data.get("compared") or []), dict(data.get("not_compared") or {}),
                   dict(data.get("tie_resolved") or {}))

    def stage_rows(self, exact_stages, suffix: str = "") -> list:
        """One CSV row per stage: drifts for tensors, exact-match verdicts for the ``exact_stages``
        that were compared, a FAIL row for every other stage with a mismatch (one side lacked
        it) and a NOT COMPARED row for each stage the reference declared it could not compute. A stage
        that was not compared never gets a PASS row."""
        rows = [d.stage_row(suffix) for d in self.drifts]
        listed = {d.stage for d in self.drifts}
        for stage in list(exact_stages) + [m.stage for m in self.mismatches]:
            if stage in listed:
                continue
            found = next((m for m in self.mismatches if m.stage == stage), None)
            if found is not None:
                rows.append(StageRow(stage=stage, source=self.source, status="FAIL", detail=found.explained()))
            elif stage in self.compared:
                rows.append(StageRow(stage=stage, source=self.source, status="PASS", detail=self.match_detail(stage)))
            else:
                continue
            listed.add(stage)
        rows.extend(StageRow(stage=stage, source=self.source, status=NOT_COMPARED, detail=why)
                    for stage, why in self.not_compared.items() if stage not in listed)
        return rows


    def match_detail(self, stage: str) -> str:
        """"exact match", or "tie-resolved" with the count when ranks of ``stage`` were taken
        from the reference at a float tie (fvkit.parity.rank_ties): equal, but not exactly."""
        n = self.tie_resolved.get(stage, 0)
        return tie_resolved_text(n) if n else "exact match"


def tie_resolved_text(n: int) -> str:
    """How a match that needed ``n`` tie-resolved ranks is written in the CSV, the log and the page."""
    return f"tie-resolved: {n} rank(s) taken from the reference at a float tie within RANK_TIE_REL_TOL"


def comparisons_as_dict(comparisons: dict) -> dict:
    return {key: {source: c.as_dict() for source, c in by_source.items()} for key, by_source in comparisons.items()}


def by_source(key: str, value: dict) -> dict:
    """One check key's comparisons, source -> Comparison (records or report dicts)."""
    gate = key.partition("[")[0]
    return {source: c if isinstance(c, Comparison) else Comparison.from_dict(gate, c) for source, c in value.items()}


def split_metrics(metrics: dict) -> tuple:
    """(measurements, comparisons) of a report's ``metrics``: entries under a gate's check key
    (:func:`fvkit.parity.registry.is_check_key`) are comparisons by source, the rest measurements."""
    measurements, comparisons = {}, {}
    for key, value in (metrics or {}).items():
        if is_check_key(key) and isinstance(value, dict):
            comparisons[key] = by_source(key, value)
        else:
            measurements[key] = value
    return measurements, comparisons


# --- CSV ---------------------------------------------------------------------------------------
@dataclass
class StageRow:
    """One row of ``parity_suite_stages.csv``; its fields are the columns, in order.

        StageRow(stage="reduced_run", status="PASS", seconds=1.2, detail="10 stage files in ...")

    A gate fills stage to detail; the report adds model, gate and test. ``None``
    is an empty cell; lists (the worst index) are written as JSON.
    """

    model: str = ""
    gate: str = ""
    stage: str = ""
    test: str = ""
    source: str = ""
    status: str = ""
    max_abs_drift: Optional[float] = None
    rel_drift: Optional[float] = None
    tolerance: Optional[float] = None
    tolerance_name: Optional[str] = None
    worst_index: object = None
    seconds: Optional[float] = None
    detail: str = ""
    #: The transformers release the model's reference numbers come from (filled per model by the report).
    reference_transformers: str = ""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_csv(self) -> dict:
        return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in self.as_dict().items()}

    @classmethod
    def from_dict(cls, data: dict) -> "StageRow":
        return cls(**_known(cls, data, "a stage row"))


STAGE_COLUMNS = tuple(f.name for f in fields(StageRow))


# --- what a gate test ships ---------------------------------------------------------------
@dataclass
class Findings:
    """What one gate test records while it runs (any number of times; the plugin merges them).

        Findings(comparisons={"M2": {"snapshot": check}}, stage_rows=[...], notes=["..."])
        Findings(timings={"indirect_effect_fast": 0.8}, page=packed_entry)
    """

    metrics: dict = field(default_factory=dict)        # free-form measurements, by name
    comparisons: dict = field(default_factory=dict)    # check key -> source -> Comparison
    stage_rows: list = field(default_factory=list)     # StageRow
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)       # the model's settings, as the report lists them
    timings: dict = field(default_factory=dict)        # stage -> seconds
    reference: dict = field(default_factory=dict)      # the live reference's environment and timings
    page: Optional[dict] = None                        # packed page entry (fvkit.report.page.pack_entry)

    def __post_init__(self):
        self.stage_rows = [r if isinstance(r, StageRow) else StageRow.from_dict(r) for r in self.stage_rows]

    def as_dict(self) -> dict:
        """Plain data for ``user_properties`` (crosses xdist)."""
        return {"metrics": self.metrics, "comparisons": comparisons_as_dict(self.comparisons),
                "stage_rows": [r.as_dict() for r in self.stage_rows], "notes": list(self.notes),
                "settings": self.settings, "timings": self.timings, "reference": self.reference, "page": self.page}

    @classmethod
    def from_dict(cls, data: dict) -> "Findings":
        data = dict(_known(cls, data, "a gate test's recorded findings"))
        measurements, comparisons = split_metrics(data.get("metrics") or {})
        for key, value in (data.get("comparisons") or {}).items():
            if not is_check_key(key):
                raise RecordError(f"recorded comparisons are filed under {key!r}, which names no registered gate; "
                                  f"use fvkit.parity.registry.check_key(gate, label)")
            comparisons[key] = by_source(key, value)
        return cls(metrics=measurements, comparisons=comparisons,
                   stage_rows=list(data.get("stage_rows") or []),
                   notes=list(data.get("notes") or []), settings=dict(data.get("settings") or {}),
                   timings=dict(data.get("timings") or {}), reference=dict(data.get("reference") or {}),
                   page=data.get("page"))

    def merge(self, other: "Findings") -> None:
        """Add ``other`` (recorded later): dicts update, rows append, notes once each, a newer page wins."""
        self.metrics.update(other.metrics)
        self.comparisons.update(other.comparisons)
        self.stage_rows.extend(other.stage_rows)
        self.notes.extend(n for n in other.notes if n not in self.notes)
        self.settings.update(other.settings)
        self.timings.update(other.timings)
        self.reference.update(other.reference)
        if other.page is not None:
            self.page = other.page


# --- one gate test's final state ----------------------------------------------------------
@dataclass
class GateOutcome:
    """One gate test's final state, built from its pytest reports.

        GateOutcome(nodeid, model="tiny-llama", gate="M2", test="test_mean_activations", status="PASS")
    """

    nodeid: str
    model: str
    gate: str
    test: str
    status: str = "PASS"
    cause: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)       # free-form measurements
    comparisons: dict = field(default_factory=dict)   # check key -> source -> Comparison
    stage_rows: list = field(default_factory=list)    # StageRow
    notes: list = field(default_factory=list)

    def __post_init__(self):
        self.stage_rows = [r if isinstance(r, StageRow) else StageRow.from_dict(r) for r in self.stage_rows]

    def absorb(self, findings: Findings) -> None:
        """Take a test's recorded measurements, comparisons, rows and notes."""
        self.metrics.update(findings.metrics)
        self.comparisons.update(findings.comparisons)
        self.stage_rows.extend(findings.stage_rows)
        self.notes.extend(n for n in findings.notes if n not in self.notes)

    def report_metrics(self) -> dict:
        """The report's ``metrics``: measurements, then comparisons under their check keys."""
        return {**self.metrics, **comparisons_as_dict(self.comparisons)}

    def as_dict(self) -> dict:
        """The report's test entry; cause, metrics and notes are left out when empty."""
        out = {"nodeid": self.nodeid, "test": self.test, "status": self.status, "seconds": round(self.seconds, 4)}
        if self.cause:
            out["cause"] = self.cause
        metrics = self.report_metrics()
        if metrics:
            out["metrics"] = metrics
        if self.notes:
            out["notes"] = self.notes
        return out

    @classmethod
    def from_dict(cls, data: dict, model: str = "", gate: str = "") -> "GateOutcome":
        """A test entry read back from a report (the page); absent fields take their defaults."""
        measurements, comparisons = split_metrics(data.get("metrics") or {})
        return cls(nodeid=data.get("nodeid", ""), model=model, gate=gate, test=data.get("test", ""),
                   status=data.get("status", ""), cause=data.get("cause", ""), seconds=data.get("seconds", 0.0),
                   metrics=measurements, comparisons=comparisons, notes=list(data.get("notes") or []))

    def csv_rows(self) -> list:
        """This test's rows of the stages CSV; a test that recorded none gets one row with its status."""
        if not self.stage_rows:
            return [StageRow(model=self.model, gate=self.gate, test=self.test, status=self.status,
                             seconds=round(self.seconds, 4),
                             detail=self.cause.splitlines()[0][:200] if self.cause else "")]
        return [replace(row, model=self.model, gate=self.gate, test=self.test, status=row.status or self.status)
                for row in self.stage_rows]


def worst_status(statuses) -> str:
    """A gate's status from its tests': any error or failure wins; all skipped is a skip."""
    statuses = list(statuses)
    for status in STATUS_ORDER[:3]:
        if status in statuses:
            return status
    return "SKIP"
