"""Running one gate against every reference source it has: live and snapshot.

    gate = Gate("M2", ctx)                          # ctx: GateContext from the conftest fixtures
    gate.prepare()                                  # no reference numbers: skipped here, nothing computed
    gate.check(ours=result.comparable())            # compares, records, then fails or passes

Sources, in order: the live reference run (``--reference-src``) unless it
declares the gate's stages unsupported or invalid, and the stored snapshot for
the model and settings key. Under ``--snapshot-update`` the live reference's
numbers are written (never fvkit's) and fvkit is compared live only. With no
source at all the test is *skipped* with the reason — it never passes silently.
A snapshot file that is there but cannot be read is an error naming the file
(:class:`fvkit.errors.SnapshotError`; the report marks the test ERROR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from fvkit.parity.compare import compare_gate, gate_part
from fvkit.parity.injected_vector import INJECTED_KEY, vector_change
from fvkit.parity.records import Findings, MismatchRecord
from fvkit.parity.reference_release import release_mismatch
from fvkit.parity.registry import GateDef, check_key, gate_def
from fvkit.parity.report import RESULT_PROP
from fvkit.parity.snapshots import SnapshotBook

#: What a reference environment record keeps from the runner's meta.
ENV_KEYS = ("transformers", "reference_transformers", "torch", "versions", "reference_commit",
            "reference_src_matches_commit", "baukit_commit", "reference_branch", "normalizations", "warnings", "invalid",
            "unsupported", INJECTED_KEY)
#: How a stage the reference declared it cannot compute is reported (never as a pass).
CANNOT_COMPUTE = "reference cannot compute"


class Recorder:
    """Findings of one gate test, shipped to the report through ``user_properties``.

        rec = Recorder(request.node)
        rec.add(comparisons={"M2": {"snapshot": check}}, stage_rows=[StageRow(...)], notes=["..."])
        rec.add(metrics={"injection_max_abs_logit_change": {...}}, timings={...})

    Each call ships one :class:`fvkit.parity.records.Findings` (as plain data: it may
    cross xdist); every value given is kept, empty or not, and ``None`` means "not given".
    """

    def __init__(self, item):
        self.item = item

    def add(self, **data) -> None:
        findings = Findings.from_dict({k: v for k, v in data.items() if v is not None})
        self.item.user_properties.append((RESULT_PROP, findings.as_dict()))


@dataclass
class GateContext:
    """Everything a gate needs besides fvkit's numbers.

        GateContext(model="tiny-llama", settings=ps.settings_for(name), live=..., snapshot=snapshot,
                    update=False, recorder=Recorder(item))
    """

    model: str
    settings: object           # fvkit.parity.session.ModelSettings
    live: Optional[dict]
    snapshot: object           # syrupy's ``snapshot`` fixture
    update: bool
    recorder: Recorder
    bos_ids: tuple = ()
    snapshot_hint: str = ""
    #: The transformers release this model's reference numbers come from (its architecture's).
    reference_release: Optional[str] = None


def reference_environment(meta: dict) -> dict:
    return {k: meta.get(k) for k in ENV_KEYS if k in meta}


def live_problem(gate: str, live: dict) -> Optional[str]:
    """Why the live reference cannot be compared for ``gate`` (None when it can)."""
    meta = live.get("meta") or {}
    definition = gate_def(gate)
    if definition.reference_invalid_key:
        invalid = (meta.get("invalid") or {}).get(definition.reference_invalid_key)
        if invalid:
            return f"reference invalid: {invalid}"
    unsupported = meta.get("unsupported") or {}
    if isinstance(unsupported, str):
        return f"reference unsupported: {unsupported}"
    # The reference's meta["unsupported"] names the same result keys the gates read.
    missing = [k for k in definition.result_keys if k in unsupported]
    if missing and len(missing) == len(definition.result_keys):
        return "reference unsupported: " + "; ".join(f"{k}: {unsupported[k]}" for k in missing)
    return None


def reference_part(gate: str, live: dict, keys: Optional[tuple] = None) -> dict:
    """The gate's part of a reference dict, without stages the reference left out (None)."""
    part = gate_part(gate, live, keys)
    return {k: v for k, v in part.items() if v is not None}


def stored_keys(path) -> list:
    """The settings keys stored beside a missing snapshot for the same test and model: a run
    whose settings have none is told which ones it could use."""
    stem, bracket, _ = path.name.rpartition("][")
    if not bracket or not path.parent.is_dir():
        return []
    prefix = stem + "]["
    return sorted(p.name[len(prefix):-len("].json")] for p in path.parent.glob("*.json")
                  if p.name.startswith(prefix) and p.name.endswith("].json"))


@dataclass
class Source:
    """Reference numbers of one origin: the live run, or a stored snapshot (with its book)."""

    name: str
    part: dict
    book: Optional[SnapshotBook] = None
    unsupported: dict = field(default_factory=dict)  # result key -> why the reference could not compute it
    injected: Optional[dict] = None   # fvkit's vector the reference's evaluations injected (injected_vector)
    made_under: Optional[str] = None   # the transformers release a stored snapshot was made under


def declared_unsupported(meta_or_env: dict) -> dict:
    """The stages a reference run declared it cannot compute (``meta["unsupported"]``, kept in
    a snapshot's environment), as result key -> reason; a whole-run reason is handled by
    :func:`live_problem`."""
    unsupported = (meta_or_env or {}).get("unsupported")
    return dict(unsupported) if isinstance(unsupported, dict) else {}


@dataclass
class Gate:
    """One gate test's comparison against its reference sources (see module docstring).

        gate = Gate("M3", ctx, label="fast")
        gate.prepare()                   # finds sources; skips at once when there are none
        gate.check(ours)                 # compares, records, fails with every finding
        Gate("M4", ctx, label="layer sweep", keys=("layer_sweep",))   # only part of the gate's keys
    """

    gate: str
    ctx: GateContext
    label: str = ""
    keys: Optional[tuple] = None
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    found: Optional[list] = None
    missing: list = field(default_factory=list)

    @property
    def definition(self) -> GateDef:
        return gate_def(self.gate)

    @property
    def result_keys(self) -> tuple:
        """The keys of the comparable result dict this gate test compares."""
        return self.keys or self.definition.result_keys

    @property
    def title(self) -> str:
        return f"{self.gate} {self.definition.title}" + (f" [{self.label}]" if self.label else "")

    @property
    def head(self) -> str:
        return f"{self.title} for {self.ctx.model} ({self.ctx.settings.key})"

    def prepare(self, skip_if_none: bool = True) -> list:
        """Resolve the sources (writing snapshots under --snapshot-update). With none, skip
        now — before fvkit computes anything — unless the caller still has checks to run."""
        if self.found is None:
            self.found, self.missing = self._sources()
        if not self.found and skip_if_none:
            self.record()
            pytest.skip(self.skip_reason())
        return self.found

    def skip_reason(self) -> str:
        return f"{self.head}: no reference numbers: " + "; ".join(self.missing)

    def _sources(self) -> tuple:
        ctx, gate = self.ctx, self.gate
        found, missing = [], []
        usable_live = None
        if ctx.live is not None:
            problem = live_problem(gate, ctx.live)
            if problem:
                missing.append(f"live {problem}")
                self.notes.append(f"live {problem}")
            else:
                part = reference_part(gate, ctx.live, self.result_keys)
                if part:
                    usable_live = part
                    meta = ctx.live.get("meta") or {}
                    found.append(Source("live reference", part, unsupported=declared_unsupported(meta),
                                        injected=meta.get(INJECTED_KEY)))
                    if ctx.reference_release and meta.get("transformers") not in (None, ctx.reference_release):
                        self.notes.append(f"live reference ran under transformers {meta.get('transformers')}; "
                                          f"{ctx.model}'s reference numbers come from {ctx.reference_release} (compared "
                                          f"here, but snapshots are written only under {ctx.reference_release})")
                else:
                    missing.append(f"the live reference computed none of {', '.join(self.result_keys)}")
        book = SnapshotBook(ctx.snapshot, gate, ctx.settings.key)
        if ctx.update:
            if usable_live is not None:
                env = reference_environment(ctx.live.get("meta") or {})
                existed = book.exists()
                book.write(usable_live, env, ctx.model, ctx.settings.as_dict())
                self.notes.append(f"snapshot {'checked/updated' if existed else 'written'} from the live reference: "
                                  f"{book.path.name}")
            else:
                self.notes.append(f"snapshot not written: {missing[-1] if missing else 'no live reference'}")
        elif book.exists():
            stored = book.load()  # a corrupt or unreadable file raises SnapshotError: the test is an ERROR
            env = stored.get("environment") or {}
            self.notes.append(f"snapshot {book.path.name}: reference {str(env.get('reference_commit'))[:12]}, "
                              f"transformers {env.get('transformers')}")
            found.append(Source("snapshot", stored.get("value") or {}, book, declared_unsupported(env),
                                injected=env.get(INJECTED_KEY), made_under=env.get("transformers")))
        else:
            stored = stored_keys(book.path)
            missing.append(f"no snapshot {book.path.relative_to(book.path.parents[2])} for these settings"
                           + (f"; snapshots are stored for {', '.join(stored)} (pass the settings those keys name: "
                              f"mt = --max-trials, nh = --n-top-heads, el = --edit-layer)" if stored else "")
                           + (f" ({ctx.snapshot_hint})" if ctx.snapshot_hint else ""))
        return found, missing

    def record(self, by_source: Optional[dict] = None, rows=()) -> None:
        """Record this test's comparisons (source -> Comparison; none when no source was
        compared), stage rows, notes and settings."""
        comparisons = {check_key(self.gate, self.label): by_source} if by_source else {}
        self.ctx.recorder.add(comparisons=comparisons, stage_rows=list(rows), notes=list(self.notes),
                              settings=self.ctx.settings.as_dict())

    def check(self, ours: dict, guard_failures=(), adjust=None, vector=None) -> None:
        """Compare ``ours`` (a comparable dict) with every source; record; fail or skip.

        ``adjust(ours_part, ref_part) -> (ours_part, records)`` may reconcile
        differences fvkit can prove to be float ties (see fvkit.parity.rank_ties).
        ``vector``: fvkit's function vector, when ``ours`` does not hold it (the layer
        sweep); checked against a vector the reference's evaluations were given."""
        found = self.prepare(skip_if_none=False)
        ours_part = gate_part(self.gate, ours, self.result_keys)
        failures = list(guard_failures)
        by_source, rows = {}, []
        for source in found:
            # A stage the reference declared it cannot compute is left out of the comparison
            # (and shown as not compared); any other stage one side lacks fails.
            skipped = {k: why for k, why in source.unsupported.items() if k in ours_part and k not in source.part}
            mine = {k: v for k, v in ours_part.items() if k not in skipped}
            mine, ties = adjust(mine, source.part) if adjust else (mine, [])
            check = compare_gate(self.gate, mine, source.part, source.name, self.ctx.bos_ids)
            check.not_compared.update({k: why if why.startswith(CANNOT_COMPUTE) else f"{CANNOT_COMPUTE}: {why}"
                                       for k, why in skipped.items()})
            for tie in ties:  # "zero_shot" or "layer_sweep.zero_shot[layer 2]": counted per compared stage
                stage = tie["stage"].split("[", 1)[0]
                check.tie_resolved[stage] = check.tie_resolved.get(stage, 0) + 1
            if ties:
                check.notes.append(f"{len(ties)} rank(s) differ only by a float tie within RANK_TIE_REL_TOL: "
                                   + "; ".join(f"{t['stage']}.{t['list']}[{t['item']}] fvkit {t['fvkit_rank']} vs "
                                               f"{t['reference_rank']} (gap {t['relative_logit_gap']:.1e})"
                                               for t in ties[:5]))
            # Where the numbers come from (syrupy's verdict is about the numbers only); its
            # failures are part of check.failures() too, and returned for the snapshot's verdict.
            provenance = self.provenance_checks(check, source, ours.get("function_vector") if vector is None else vector)
            self.checks.append(check)
            self.notes.extend(f"{source.name}: {note}" for note in check.notes)
            by_source[source.name] = check
            rows.extend(self.stage_rows(check))
            # Against a stored snapshot the verdict on the numbers is syrupy's own assertion through
            # the tolerant extension (``check`` gives the report its per-stage rows); the provenance
            # checks, which syrupy does not see, add their own failure lines.
            if source.book is not None:
                failures.extend(provenance + source.book.verdict(mine, self.ctx.bos_ids))
            else:
                failures.extend(check.failures())
        self.record(by_source, rows)
        if failures:
            pytest.fail(f"{self.head} FAILED:\n  " + "\n  ".join(failures), pytrace=False)
        if not found:
            pytest.skip(self.skip_reason())

    def provenance_checks(self, check, source: Source, vector) -> list:
        """Where the source's numbers come from: the model's own transformers release, and,
        for evaluations of an injected vector, fvkit's vector as it is now. Adds a mismatch to
        ``check`` for each problem and returns their failure lines."""
        found = []
        release = self.ctx.reference_release
        problem = release_mismatch(self.ctx.model, release, source.made_under) if release else None
        if problem:
            found.append(MismatchRecord.of("environment.transformers", release, source.made_under).at(
                "reference release", f"{source.name} {problem}"))
        record = source.injected
        stages = [k for k in (record or {}).get("stages") or [] if k in source.part]
        change = vector_change(record, vector) if stages else None
        if change:
            found.append(MismatchRecord.of(f"{', '.join(stages)}: the injected vector", "changed",
                                           str(record.get("sha256"))[:12]).at(INJECTED_KEY, change))
        elif stages:
            check.notes.append(f"{', '.join(stages)}: the reference's n_shot_eval evaluated fvkit's function vector "
                               f"(the reference cannot build its own: {record.get('why')}); that vector (sha256 "
                               f"{str(record.get('sha256'))[:12]}, norm {record.get('norm', 0.0):.6g}) is fvkit's "
                               f"vector now")
        check.mismatches.extend(found)
        return [f"{m.stage} vs {source.name}: {m.explained()}" for m in found]

    def stage_rows(self, check) -> list:
        """One CSV row per stage: drifts for tensors, exact-match verdicts for the rest."""
        suffix = f" [{self.label}]" if self.label else ""
        return check.stage_rows(self.definition.exact_stages_of(self.result_keys), suffix)
