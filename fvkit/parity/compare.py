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
        if ref.get(key) is None:
            check.notes.append(f"reference has no '{key}'")
            continue
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
        check.mismatches.append(mm.at(f"m1.{key}", cause))
    return check


# --- M2 / M3 ----------------------------------------------------------------------------
def tensor_drifts(gate: GateDef, ours: dict, ref: dict, source: str, only_present: bool = True) -> list:
    """A drift per tensor stage of the gate, with the gate's tolerance; with ``only_present``
    just the stages the reference holds (M4: a reference may void its vector)."""
    return [tensor_drift(key, ours.get(key), ref.get(key), tolerances.TOLERANCES[name], name, source=source)
            for key, name in gate.drift_stages.items() if key in ref or not only_present]


def compare_tensors(gate: GateDef, ours: dict, ref: dict, source: str, bos_ids=()) -> Comparison:
    """Gates that only compare tensors (M2, M3): every drift stage must be there."""
    check = Comparison(gate.name, source)
    check.drifts.extend(tensor_drifts(gate, ours, ref, source, only_present=False))
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
    sweep too); only the parts the reference holds are compared."""
    check = Comparison(gate.name, source)
    if "top_heads" in ref:
        mm = compare_top_heads(ours.get("top_heads") or [], ref["top_heads"])
        if mm:
            check.mismatches.append(mm.at("top_heads"))
    check.drifts.extend(tensor_drifts(gate, ours, ref, source))
    for stage, keys in EVAL_KEYS.items():
        if stage not in ref:
            continue
        for key in keys:
            if key not in ref[stage]:
                continue
            mm = first_mismatch((ours.get(stage) or {}).get(key), ref[stage][key], f"{stage}.{key}")
            if mm:
                check.mismatches.append(mm.at(stage))
    for stage, ref_layers in (ref.get(SWEEP_KEY) or {}).items():
        mine = (ours.get(SWEEP_KEY) or {}).get(stage) or []
        name = f"{SWEEP_KEY}.{stage}"
        if len(mine) != len(ref_layers):
            check.mismatches.append(MismatchRecord.of(f"{name}: number of layers", len(mine), len(ref_layers)).at(name))
            continue
        for layer, (a, b) in enumerate(zip(mine, ref_layers)):
            mm = next((m for m in (first_mismatch(a.get(k), b[k], f"{name}[layer {layer}].{k}")
                                   for k in EVAL_KEYS[stage] if k in b) if m), None)
            if mm:
                check.mismatches.append(mm.at(name))
                break
    return check


def compare_gate(gate: str, ours: dict, ref: dict, source: str = "reference", bos_ids=()) -> Comparison:
    """Compare the parts of two comparable result dicts that ``gate`` owns, with its registered comparison."""
    definition = gate_def(gate)
    return definition.comparison()(definition, ours, ref, source, bos_ids)
