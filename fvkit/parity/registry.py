"""The parity gates, each defined once: what it checks, how it compares, how its tests are named.

    from fvkit.parity.registry import GATES, gate_def
    GATES                               # ("M1", "M2", "M3", "M4", "M5"), in run order
    gate_def("M2").result_keys          # ("mean_activations",)
    gate_def("M2").drift_stages         # {"mean_activations": "MEAN_ACT_REL_TOL"}
    gate_def("M4").comparison()         # fvkit.parity.compare.compare_m4

Everything that knows about gates reads this table: the comparison
(:mod:`fvkit.parity.compare`), the gate runner and its CSV rows
(:mod:`fvkit.parity.gate_runner`), the report and page (titles, order, which
metrics are gate comparisons), the plugin (order, ``--fail-fast``), the xdist
scheduling and the conftest (test ids) and the pipeline (the result keys its
comparable dict holds). Adding a gate is one :class:`GateDef` here, its
comparison function when it compares reference numbers, and its test module in
``parity_tests/``.

Torch-free on purpose: the pytest plugin imports it at start-up, in every
pytest run of an environment with fvkit installed. Comparison functions are
named by dotted path and imported only when a gate compares.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Optional, Union

from fvkit.errors import FvkitError

# --- result layout shared by fvkit's pipeline and the reference runner ------------------------
#: Keys of the ``m1`` sub-dict M1 compares. ``split`` is the train/valid/test split the
#: reference's loader drew and ``draws`` the word pairs each of its stages sampled
#: (fvkit's side: the fixed-trials file's), so the trials are checked against the
#: reference's own sampling. ``idx_avg`` holds the multi-token words averaged into one slot.
M1_KEYS = ("draws", "prompts", "token_ids", "token_labels", "dummy_labels", "idx_map", "idx_avg", "split")
#: Evaluation stages and the keys of each that must equal the reference's exactly.
EVAL_KEYS = MappingProxyType({
    "zero_shot": ("clean_rank_list", "intervention_rank_list", "clean_topk", "intervention_topk"),
    "shuffled": ("clean_rank_list", "intervention_rank_list", "clean_topk", "intervention_topk"),
    "baseline": ("clean_rank_list", "clean_topk"),
})
#: The layer sweep: per stage, one evaluation dict per layer (``layer_sweep[stage][layer]``).
SWEEP_KEY = "layer_sweep"
SWEEP_STAGES = ("zero_shot", "shuffled")
#: Keys of ``PipelineResult.comparable()`` besides ``meta``, in pipeline order; the
#: reference runner returns the same layout (the layer sweep comes from its own run).
PIPELINE_RESULT_KEYS = ("m1", "mean_activations", "indirect_effect", "top_heads", "function_vector",
                        "zero_shot", "shuffled", "baseline")

#: Test-id scopes: a ``model`` gate runs once per --model (id ``[<model>]``); a ``spec``
#: gate once per registered spec on the model serving it (id ``[<spec>:<model>]``).
SCOPES = ("model", "spec")


class GateError(FvkitError):
    """A gate name or gate definition that the registry does not hold."""


@dataclass(frozen=True)
class GateDef:
    """One parity gate.

        GateDef("M2", "mean_activations", result_keys=("mean_activations",),
                compare="fvkit.parity.compare:compare_tensors",
                drift_stages={"mean_activations": "MEAN_ACT_REL_TOL"})

    ``result_keys``: keys of the comparable result dict it reads. ``compare``: its
    comparison function (``module:function`` or a callable) taking
    ``(gate_def, ours, ref, source, bos_ids)`` and returning a
    :class:`fvkit.parity.records.Comparison`; None when the gate compares no
    reference numbers. ``drift_stages``: tensor result keys compared with a drift
    tolerance, by tolerance name (:mod:`fvkit.parity.tolerances`). ``exact_stages``:
    per result key, the stages compared exactly, as the comparison names them (one
    CSV row each). ``tolerances``: every tolerance the gate applies. ``scope``: see
    :data:`SCOPES`. ``reference_invalid_key``: the key under which the reference
    runner's ``meta["invalid"]`` voids this gate's numbers.
    """

    name: str
    title: str
    result_keys: tuple = ()
    compare: Union[str, Callable, None] = None
    drift_stages: Mapping = field(default_factory=dict)
    exact_stages: Mapping = field(default_factory=dict)
    tolerances: tuple = ()
    scope: str = "model"
    reference_invalid_key: Optional[str] = None

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise GateError(f"gate {self.name}: scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        # Frozen all the way down: a definition is shared by every test of the session.
        object.__setattr__(self, "drift_stages", MappingProxyType(dict(self.drift_stages)))
        object.__setattr__(self, "exact_stages", MappingProxyType({k: tuple(v) for k, v in self.exact_stages.items()}))

    @property
    def compares(self) -> bool:
        return self.compare is not None

    def comparison(self) -> Callable:
        """The comparison function (imported on first use: comparisons need torch)."""
        if self.compare is None:
            raise GateError(f"gate {self.name} ({self.title}) compares no reference numbers")
        if callable(self.compare):
            return self.compare
        module, _, name = self.compare.partition(":")
        return getattr(importlib.import_module(module), name)

    def exact_stages_of(self, keys) -> tuple:
        """The exactly compared stages of ``keys`` (a subset of the result keys), in order."""
        return tuple(stage for key in keys for stage in self.exact_stages.get(key, ()))


GATE_DEFS = (
    GateDef("M1", "prompts", result_keys=("m1",), compare="fvkit.parity.compare:compare_m1",
            exact_stages={"m1": tuple(f"m1.{k}" for k in M1_KEYS)}),
    GateDef("M2", "mean_activations", result_keys=("mean_activations",),
            compare="fvkit.parity.compare:compare_tensors",
            drift_stages={"mean_activations": "MEAN_ACT_REL_TOL"}, tolerances=("MEAN_ACT_REL_TOL",)),
    GateDef("M3", "indirect_effect", result_keys=("indirect_effect",),
            compare="fvkit.parity.compare:compare_tensors",
            drift_stages={"indirect_effect": "IE_REL_TOL"}, tolerances=("IE_REL_TOL", "IE_ABS_FLOOR")),
    GateDef("M4", "function_vector",
            result_keys=("top_heads", "function_vector", "zero_shot", "shuffled", "baseline"),
            compare="fvkit.parity.compare:compare_m4",
            drift_stages={"function_vector": "FV_REL_TOL"},
            exact_stages={"top_heads": ("top_heads",), "zero_shot": ("zero_shot",), "shuffled": ("shuffled",),
                          "baseline": ("baseline",),
                          SWEEP_KEY: tuple(f"{SWEEP_KEY}.{stage}" for stage in SWEEP_STAGES)},
            tolerances=("FV_REL_TOL", "TOP_HEAD_SCORE_ABS_TOL", "RANK_TIE_REL_TOL", "VOCAB_LOGITS_REL_TOL",
                        "MIN_INJECTION_LOGIT_CHANGE"),
            reference_invalid_key="m4"),
    GateDef("M5", "spec_resolution", scope="spec"),
)

GATES = tuple(g.name for g in GATE_DEFS)
GATE_TITLES = MappingProxyType({g.name: g.title for g in GATE_DEFS})
_BY_NAME = {g.name: g for g in GATE_DEFS}


def gate_def(name: str) -> GateDef:
    """The definition of gate ``name``; an unknown name raises GateError listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise GateError(f"unknown parity gate {name!r}; the registered gates are {', '.join(GATES)} "
                        f"(fvkit/parity/registry.py)") from None


def gate_index(name: str) -> int:
    """Run-order position of a gate; unknown names sort after every registered gate."""
    return GATES.index(name) if name in GATES else len(GATES)


# --- names in the report ------------------------------------------------------------------
def check_key(gate: str, label: str = "") -> str:
    """The key of one gate test's comparisons in the report's metrics: ``M3`` or ``M3[fast]``."""
    return gate + (f"[{label}]" if label else "")


def is_check_key(key: str) -> bool:
    """Whether a metrics key holds gate comparisons (by source), not a free-form measurement."""
    gate, bracket, rest = key.partition("[")
    return gate in _BY_NAME and (not bracket or rest.endswith("]"))


# --- test ids -----------------------------------------------------------------------------
def param_id(model: str, spec: Optional[str] = None) -> str:
    """A gate test's parameter id: ``<model>``, or ``<spec>:<model>`` for a spec-scoped gate.

    The model comes last so that :func:`model_of_param_id` (xdist scheduling) finds it."""
    return f"{spec}:{model}" if spec is not None else model


def model_of_param_id(param: str) -> str:
    """The model a parameter id names (see :func:`param_id`)."""
    return param.rsplit(":", 1)[-1]


def spec_of_param_id(param: str) -> Optional[str]:
    """The spec a spec-scoped parameter id names; None for a model-scoped one."""
    spec, colon, _ = param.rpartition(":")
    return spec if colon else None


def param_id_of_nodeid(nodeid: str) -> Optional[str]:
    """The parameter id of a test id (``...::test_x[<param>]``); None for an unparametrized test."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    return nodeid.rsplit("[", 1)[1][:-1]
