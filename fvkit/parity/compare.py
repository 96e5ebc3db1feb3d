"""How each parity gate compares fvkit's numbers with the reference's.

    ours = result.comparable()                     # fvkit.pipeline.PipelineResult
    check = compare_gate("M2", gate_part("M2", ours), gate_part("M2", ref), source="snapshot")
    assert check.ok, "\\n".join(check.failures())

Both the gate tests and the snapshot extension (:mod:`fvkit.parity.snapshots`)
call :func:`compare_gate`, so a snapshot matches exactly when the gate passes.
Which function compares a gate, which keys it reads and which tolerance each
tensor gets come from the gate's definition (:mod:`fvkit.parity.registry`).
Inputs are the plain-Python parts of the comparable result dict that the
reference runner and ``PipelineResult.comparable()`` share; the result is a
:class:`fvkit.parity.records.Comparison`.

A stage one side produced and the other did not is a mismatch, never a silent
pass: nothing was compared, so nothing may be reported as matching. Each
comparison lists the stages it did compare (``Comparison.compared``); only
those get a PASS row.
"""

from __future__ import annotations

from typing import Optional

from fvkit.parity import tolerances
from fvkit.parity.drift import first_mismatch, tensor_drift
from fvkit.parity.records import Comparison, MismatchRecord
from fvkit.parity.registry import EVAL_KEYS, M1_KEYS, SWEEP_KEY, SWEEP_STAGES, GateDef, gate_def
from fvkit.parity.tolerances import TOP_HEAD_SCORE_ABS_TOL


def _eval_part(stage: str, value: dict) -> dict:
    return {k: value[k] for k in EVAL_KEYS[stage] if k in value}


def gate_part(gate: str, comparable: dict, keys: Optional[tuple] = None) -> dict:
    """The keys of a comparable result dict that ``gate`` compares (or just ``keys``)."""
    part = {}
    for key in keys or gate_def(gate).result_keys:
        if key not in comparable:
            continue
        value = comparable[key]
        if key in EVAL_KEYS and isinstance(value, dict):
            value = _eval_part(key, value)
        elif key == SWEEP_KEY and isinstance(value, dict):
            value = {stage: [_eval_part(stage, v) for v in layers] for stage, layers in value.items()
                     if stage in SWEEP_STAGES}
        part[key] = value
    return part


def sweep_comparable(sweep: dict) -> dict:
    """fvkit's layer sweep (:func:`fvkit.fast.sweep.layer_sweep`) in the reference's layout."""
    from fvkit.fast.sweep import layer_result

    return {SWEEP_KEY: {stage: [_eval_part(stage, layer_result(sweep, stage, layer))
                                for layer in range(sweep["n_layers"])]
                        for stage in SWEEP_STAGES if stage in sweep["stages"]}}


# --- stages present on one side only ----------------------------------------------------------
#: What a stage missing on one side shows in place of its value.
ABSENT, PRESENT = "<not produced>", "<produced>"


def produced(part: dict, key) -> bool:
    """Whether a result dict holds ``key`` with a value (None is what a side that skipped a stage writes)."""
    return isinstance(part, dict) and part.get(key) is not None


def presence_mismatch(stage: str, path: str, ours: dict, ref: dict) -> Optional[MismatchRecord]:
    """A mismatch when exactly one side produced ``path`` (a key of both dicts), else None."""
    key = path.rsplit(".", 1)[-1]
    mine, theirs = produced(ours, key), produced(ref, key)
    if mine == theirs:
        return None
    if theirs:
        return MismatchRecord.of(f"{path}: produced by the reference, not by fvkit", ABSENT, PRESENT).at(
            stage, "fvkit's pipeline left this stage out")
    return MismatchRecord.of(f"{path}: produced by fvkit, not by the reference", PRESENT, ABSENT).at(
        stage, "the reference numbers lack this stage; regenerate the snapshot from a live reference run "
               "(--reference-src ... --snapshot-update)")


def both_produced(check: Comparison, stage: str, path: str, ours: dict, ref: dict) -> bool:
    """Whether both sides hold ``path``; a part only one side produced goes into ``check`` as a mismatch."""
    missing = presence_mismatch(stage, path, ours, ref)
    if missing:
        check.mismatches.append(missing)
        return False
    return produced(ref, path.rsplit(".", 1)[-1])


def field_mismatch(stage: str, path: str, ours: dict, ref: dict) -> Optional[MismatchRecord]:
    """The first difference in field ``path`` of two result dicts: one side only, or the values."""
    missing = presence_mismatch(stage, path, ours, ref)
    key = path.rsplit(".", 1)[-1]
    if missing or not produced(ref, key):
        return missing
    mm = first_mismatch(ours[key], ref[key], path)
    return mm.at(stage) if mm else None


# --- M1 ------------------------------------------------------------------------------
def token_cause(ours: dict, ref: dict, index: int, bos_ids=()) -> str:
    """Why the token ids differ first at ``index``: the BOS policy, the prompt text, or the tokenizer."""
    ours_ids, ref_ids = ours.get("token_ids") or [], ref.get("token_ids") or []
    ours_text = (ours.get("prompts", {}).get("mean_activations") or [None])[0]
    ref_text = (ref.get("prompts", {}).get("mean_activations") or [None])[0]
    shifted = ours_ids[1:] == ref_ids or ref_ids[1:] == ours_ids
    first_is_bos = any(ids and ids[0] in bos_ids for ids in (ours_ids, ref_ids))
    if index == 0 and (shifted or first_is_bos):
        who = "fvkit" if len(ours_ids) > len(ref_ids) else "the reference"
        return f"BOS policy ({who} has an extra leading BOS token; check the spec's prepend_bos / bos_text)"
    if ours_text is not None and ours_text != ref_text:
        if ref_text and ours_text.endswith(ref_text) or ours_text and ref_text and ref_text.endswith(ours_text):
            return "BOS policy (one prompt text carries a BOS string the other lacks)"
        return "prompt text (template or fixed trials differ; see the prompts mismatch)"
    return "tokenizer (same prompt text, different token ids: vocabulary, merges or normalization differ)"


def _token_repr(m1: dict, index: int) -> str:
    ids = m1.get("token_ids") or []
    labels = m1.get("token_labels") or []
    tok = next((t[1] for t in labels if t and t[0] == index), None)
    tid = ids[index] if index < len(ids) else "<none>"
    return f"{tok!r} (id {tid})" if tok is not None else f"id {tid}"


def compare_m1(gate: GateDef, ours: dict, ref: dict, source: str, bos_ids=()) -> Comparison:
    """Prompts, token ids and labels exactly; a token mismatch names its position and likely cause."""
    check = Comparison(gate.name, source)
    ours, ref = ours.get("m1", {}), ref.get("m1", {})
    for key in M1_KEYS:
        missing = presence_mismatch(f"m1.{key}", key, ours, ref)
        if missing:
            check.mismatches.append(missing)
            continue
        if ref.get(key) is None:
            check.notes.append(f"neither side has '{key}'")
            continue
        check.compared.append(f"m1.{key}")
        mm = first_mismatch(ours.get(key), ref.get(key), key)
        if mm is None:
            continue
        cause = ""
        if key == "token_ids":
            a, b = ours.get("token_ids") or [], ref.get("token_ids") or []
            index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            cause = token_cause(ours, ref, index, bos_ids)
            mm = MismatchRecord.of(f"token_ids: first differing token at position {index}",
                                   _token_repr(ours, index), _token_repr(ref, index))
        elif key == "prompts":
            cause = "prompt text (template, BOS text or fixed trials)"
        elif key == "draws":
            cause = ("fixed trials (the trials file does not give the pairs the reference's own sampling drew; "
                     "regenerate it with `fvkit trials`)")
        elif key == "idx_avg":
            cause = "slot index map (which multi-token words are averaged into one slot)"
        check.mismatches.append(mm.at(f"m1.{key}", cause))
    return check


# --- M2 / M3 ----------------------------------------------------------------------------
def compare_drift_stages(gate: GateDef, check: Comparison, ours: dict, ref: dict, required: bool) -> None:
    """A drift per tensor stage both sides produced, with the gate's tolerance; a stage
    only one side produced is a mismatch. With ``required`` a stage neither side
    produced is one too (M2, M3 compare nothing else)."""
    for key, name in gate.drift_stages.items():
        missing = presence_mismatch(key, key, ours, ref)
        if missing:
            check.mismatches.append(missing)
        elif produced(ref, key):
            floor_name = tolerances.ABS_FLOORS.get(name, "")
            check.drifts.append(tensor_drift(key, ours[key], ref[key], tolerances.TOLERANCES[name], name,
                                             source=check.source, floor=tolerances.TOLERANCES.get(floor_name, 0.0),
                                             floor_name=floor_name))
        elif required:
            check.mismatches.append(MismatchRecord.of(f"{key}: produced by neither side", ABSENT, ABSENT).at(
                key, "nothing to compare"))


def compare_tensors(gate: GateDef, ours: dict, ref: dict, source: str, bos_ids=()) -> Comparison:
    """Gates that only compare tensors (M2, M3): every drift stage must be there on both sides."""
    check = Comparison(gate.name, source)
    compare_drift_stages(gate, check, ours, ref, required=True)
    return check


# --- M4 ------------------------------------------------------------------------------
def compare_top_heads(ours: list, ref: list) -> Optional[MismatchRecord]:
    """Same heads in the same order; scores equal up to one unit of their 4th decimal."""
    if len(ours) != len(ref):
        return MismatchRecord.of("top_heads length", len(ours), len(ref))
    for i, (a, b) in enumerate(zip(ours, ref)):
        if [int(a[0]), int(a[1])] != [int(b[0]), int(b[1])]:
            return MismatchRecord.of(f"top_heads[{i}] (layer, head)", a, b)
        if abs(float(a[2]) - float(b[2])) > TOP_HEAD_SCORE_ABS_TOL:
            return MismatchRecord.of(f"top_heads[{i}] score (tolerance TOP_HEAD_SCORE_ABS_TOL={TOP_HEAD_SCORE_ABS_TOL:.0e})", a, b)
    return None


def compare_m4(gate: GateDef, ours: dict, ref: dict, source: str, bos_ids=()) -> Comparison:
    """Top heads, then the vector's drift, then every rank list and top-k exactly (the layer
    sweep too). A part neither side holds is not compared (the layer sweep outside
    ``--edit-layer all``); a part only one side holds fails."""
    check = Comparison(gate.name, source)
    if both_produced(check, "top_heads", "top_heads", ours, ref):
        check.compared.append("top_heads")
        mm = compare_top_heads(ours["top_heads"], ref["top_heads"])
        if mm:
            check.mismatches.append(mm.at("top_heads"))
    compare_drift_stages(gate, check, ours, ref, required=False)
    for stage, keys in EVAL_KEYS.items():
        if not both_produced(check, stage, stage, ours, ref):
            continue
        check.compared.append(stage)
        for key in keys:
            mm = field_mismatch(stage, f"{stage}.{key}", ours[stage], ref[stage])
            if mm:
                check.mismatches.append(mm)
    ours_sweep, ref_sweep = ours.get(SWEEP_KEY) or {}, ref.get(SWEEP_KEY) or {}
    for stage in SWEEP_STAGES:
        name = f"{SWEEP_KEY}.{stage}"
        if not both_produced(check, name, name, ours_sweep, ref_sweep):
            continue
        check.compared.append(name)
        mine, ref_layers = ours_sweep[stage], ref_sweep[stage]
        if len(mine) != len(ref_layers):
            check.mismatches.append(MismatchRecord.of(f"{name}: number of layers", len(mine), len(ref_layers)).at(name))
            continue
        for layer, (a, b) in enumerate(zip(mine, ref_layers)):
            mm = next((m for m in (field_mismatch(name, f"{name}[layer {layer}].{k}", a, b)
                                   for k in EVAL_KEYS[stage]) if m), None)
            if mm:
                check.mismatches.append(mm)
                break
    return check


def compare_gate(gate: str, ours: dict, ref: dict, source: str = "reference", bos_ids=()) -> Comparison:
    """Compare the parts of two comparable result dicts that ``gate`` owns, with its registered comparison."""
    definition = gate_def(gate)
    check = definition.comparison()(definition, ours, ref, source, bos_ids)
    if not (check.drifts or check.compared or check.mismatches):
        # Both parts empty: a comparison that looked at nothing must not read as a match.
        keys = ", ".join(definition.result_keys)
        check.mismatches.append(MismatchRecord.of(f"{gate}: nothing compared", ABSENT, ABSENT).at(
            gate, f"neither fvkit nor the reference produced any of {keys}"))
    return check
