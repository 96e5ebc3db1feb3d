"""The reference's stage functions, each called as the reference's scripts call it.

Every stage that draws prompts runs right after the reference's ``set_seed(seed)``
(``compute_function_vector`` is not reseeded, like the script), with
``filter_set=None`` and the template the scripts pass. A stage marked unsupported
is skipped and stays ``None``; a stage that raises on a supported model ends the
run with :class:`ReferenceStageError`.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Optional

from fvkit.errors import FvkitError

from .keys import RESULT_STAGES
from .loading import ReferenceModules
from .recording import Recorder
from .settings import RunSettings

#: Decimal places of the per-stage seconds in ``meta["timings"]``.
TIMING_DIGITS = 4


class ReferenceStageError(FvkitError):
    """A reference stage raised on a model the runner considered supported."""


def heads_of_failed_call(err: BaseException, code) -> Optional[list]:
    """``top_heads`` of the reference call running ``code`` when ``err`` was raised in it
    (None when the error came from elsewhere or before the heads were ranked)."""
    tb = err.__traceback__
    heads = None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            heads = tb.tb_frame.f_locals.get("top_heads")
        tb = tb.tb_next
    return list(heads) if heads is not None else None


def eval_result(res: dict, with_intervention: bool) -> dict:
    """An ``n_shot_eval`` result in plain values: rank lists and top-k accuracies."""
    out = {"clean_rank_list": [int(r) for r in res["clean_rank_list"]],
           "clean_topk": [[int(k), float(a)] for k, a in res["clean_topk"]]}
    if with_intervention:
        out["intervention_rank_list"] = [int(r) for r in res["intervention_rank_list"]]
        out["intervention_topk"] = [[int(k), float(a)] for k, a in res["intervention_topk"]]
    return out


def script_template(refs: ReferenceModules) -> tuple:
    """(prefixes, separators): the scripts pass their argparse template, which equals
    the defaults of ``word_pairs_to_prompt_data``."""
    template = inspect.signature(refs.prompt_utils.word_pairs_to_prompt_data).parameters
    return template["prefixes"].default, template["separators"].default


class StageRunner:
    """Calls the reference's stages on one model and keeps their results and timings."""

    def __init__(self, refs: ReferenceModules, lm, model_config: dict, settings: RunSettings,
                 unsupported: dict, rec: Recorder, eval_config: Optional[dict] = None, injected_vector=None):
        self.refs, self.lm, self.model_config, self.settings = refs, lm, model_config, settings
        self.unsupported, self.rec = unsupported, rec
        self.prefixes, self.separators = script_template(refs)
        self.common = dict(model=lm.model, model_config=model_config, tokenizer=lm.tokenizer)
        # The evaluations' MODEL_CONFIG: resid_dim is the residual stream's width there
        # (see config.head_split_widths); the same dict where the widths agree.
        self.eval_config = eval_config or model_config
        self.eval_common = dict(model=lm.model, model_config=self.eval_config, tokenizer=lm.tokenizer)
        self.out: dict = {key: None for key in RESULT_STAGES}
        self.timings: dict = {}
        self.ds = None
        self.fv = None
        #: A vector from the caller, evaluated where the reference cannot build its own.
        self.injected_vector = injected_vector
        #: Notes on how this run obtained what the reference's own call could not return.
        self.notes: list = []
        self.set_seed = refs.model_utils.set_seed

    @property
    def vector(self):
        """The vector the evaluations inject: the reference's own, else the caller's."""
        own = self.out["function_vector"]
        return own if own is not None else self.injected_vector

    def run(self, key: str, prompt_stage: Optional[str], fn: Callable):
        """Run one stage (unless unsupported), recording its prompts under ``prompt_stage``."""
        if key in self.unsupported:
            return None
        self.rec.begin(prompt_stage)
        t0 = time.perf_counter()
        try:
            value = fn()
        except FvkitError:
            raise
        except Exception as err:
            raise ReferenceStageError(f"the reference's {key} stage failed on model '{getattr(self.lm, 'name', '?')}' "
                                      f"({type(err).__name__}: {err}); see the chained traceback") from err
        finally:
            self.rec.begin(None)
            self.timings[key] = round(time.perf_counter() - t0, TIMING_DIGITS)
        self.out[key] = value
        return value

    def load_dataset(self, root: str, name: str):
        self.set_seed(self.settings.seed)
        self.ds = self.refs.prompt_utils.load_dataset(name, root_data_dir=root, test_size=self.settings.test_size,
                                                      seed=self.settings.seed)
        return self.ds

    def mean_activations(self):
        s = self.settings
        self.set_seed(s.seed)
        return self.refs.extract_utils.get_mean_head_activations(
            self.ds, **self.common, n_icl_examples=s.n_shots, N_TRIALS=s.k,
            prefixes=self.prefixes, separators=self.separators, filter_set=None)

    def indirect_effect(self):
        s = self.settings
        self.set_seed(s.seed)
        return self.refs.compute_indirect_effect.compute_indirect_effect(
            self.ds, self.out["mean_activations"], **self.common, n_shots=s.n_shots, n_trials=s.k,
            last_token_only=True, prefixes=self.prefixes, separators=self.separators, filter_set=None)

    def top_heads(self):
        """``compute_function_vector``: returns the top heads and keeps the vector in ``self.fv``.

        Where the reference cannot build the vector (``function_vector`` unsupported),
        the call raises in its vector sum, after its own code has ranked and rounded
        the top heads; those are read from the failed call's frame (:func:`heads_of_failed_call`).
        """
        compute = self.refs.extract_utils.compute_function_vector
        try:
            fv, heads = compute(self.out["mean_activations"], self.out["indirect_effect"], self.lm.model,
                                model_config=self.model_config, n_top_heads=self.settings.n_top_heads)
        except Exception as err:
            if "function_vector" not in self.unsupported:
                raise
            heads = heads_of_failed_call(err, compute.__code__)
            if heads is None:
                raise
            self.notes.append(
                f"top_heads: compute_function_vector raised {type(err).__name__} ({str(err).splitlines()[0][:200]}) "
                f"in its vector sum, after ranking the heads; its top_heads list (topk of the mean indirect effect, "
                f"scores rounded to 4 decimals by its own code) was read from the failed call's frame")
            fv = None
        self.fv = fv
        return [[int(l), int(h), float(s)] for l, h, s in heads]

    def evaluation(self, shots: int, shuffle: bool, layer: Optional[int] = None) -> dict:
        """``n_shot_eval`` with the function vector at ``layer`` (default: the edit layer)."""
        layer = self.settings.edit_layer if layer is None else layer
        self.set_seed(self.settings.seed)
        kwargs = {"shuffle_labels": True} if shuffle else {}
        return eval_result(self.refs.eval_utils.n_shot_eval(
            dataset=self.ds, fv_vector=self.vector, edit_layer=layer, n_shots=shots,
            **self.eval_common, filter_set=None, prefixes=self.prefixes, separators=self.separators, **kwargs), True)

    def zero_shot(self, layer: Optional[int] = None) -> dict:
        return self.evaluation(0, False, layer)

    def shuffled(self, layer: Optional[int] = None) -> dict:
        return self.evaluation(self.settings.n_shots, True, layer)

    def baseline(self):
        self.set_seed(self.settings.seed)
        return eval_result(self.refs.eval_utils.n_shot_eval_no_intervention(
            self.ds, n_shots=self.settings.n_shots, **self.eval_common, prefixes=self.prefixes,
            separators=self.separators), False)
