"""Named faults in fvkit's own stages, for measuring what the parity gates catch.

    apply("top_heads_ascending")    # patches fvkit in this process
    FAULTS["slot_off_by_one"].what  # one line: what goes wrong

Each fault is a small, deliberate bug of the kind a refactor could introduce.
It is applied by replacing one fvkit function (or mutating one default) in the
process that runs the parity suite, before the gates' modules are imported;
:func:`apply` also rebinds every name already imported elsewhere
(``from module import name``), so every caller sees the faulty version. Nothing
here changes a file of fvkit.

The faulty functions are written from fvkit's own code with one change each,
marked ``# FAULT``.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable


class MutationError(Exception):
    """An unknown fault name, or a fault whose target no longer exists in fvkit."""


@dataclass(frozen=True)
class Fault:
    name: str
    stage: str      # the fvkit stage the bug lives in
    what: str       # one line: the bug
    install: Callable[[], None]


def replace(module_name: str, attr: str, make: Callable) -> None:
    """Replace ``module_name.attr`` with ``make(original)``, and every imported alias of it."""
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise MutationError(f"{module_name}.{attr} does not exist; update the fault table in {__file__}")
    original = getattr(module, attr)
    faulty = make(original)
    for mod in list(sys.modules.values()):
        for name, value in list(getattr(mod, "__dict__", {}).items()):
            if value is original:
                setattr(mod, name, faulty)
    setattr(module, attr, faulty)


def replace_method(module_name: str, cls_name: str, attr: str, make: Callable) -> None:
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not hasattr(cls, attr):
        raise MutationError(f"{module_name}.{cls_name}.{attr} does not exist; update the fault table in {__file__}")
    setattr(cls, attr, make(getattr(cls, attr)))


# --- the faults ---------------------------------------------------------------------------

def _slot_off_by_one():
    def make(original):
        def slot_index_map(token_labels, dummy_labels):
            idx_map, idx_avg = original(token_labels, dummy_labels)
            keys, slots = list(idx_map), list(idx_map.values())
            # FAULT: slot j reads token j+1 (the kept tokens rotated by one).
            return dict(zip(keys[1:] + keys[:1], slots)), idx_avg
        return slot_index_map
    replace("fvkit.method.token_labels", "slot_index_map", make)


def _heads_wrong_axis():
    def make(original):
        def split_heads(x, n_heads, head_dim):
            original(x, n_heads, head_dim)  # keeps the width check
            # FAULT: the width is split as (head_dim, n_heads) and transposed.
            return x.view(*x.shape[:-1], head_dim, n_heads).transpose(-1, -2)
        return split_heads
    replace("fvkit.method.activations", "split_heads", make)


def _mean_wrong_dim():
    def make(original):
        def to_slots(stack, idx_map, idx_avg, n_slots):
            slots = original(stack, idx_map, {}, n_slots)
            for lo, hi in idx_avg.values():
                # FAULT: a multi-token word is averaged over head_dim, not over its tokens.
                slots[:, :, idx_map[lo]] = stack[:, :, lo].mean(dim=-1, keepdim=True).expand_as(stack[:, :, lo])
            return slots
        return to_slots
    replace("fvkit.method.activations", "to_slots", make)


def _bos_dropped():
    def make(original):
        def token_meta_labels(prompt_data, tokenizer, prepend_bos):
            if prepend_bos:
                # FAULT: the tokenizer's BOS token is forgotten, so every label sits one token early.
                return original(prompt_data, tokenizer, False)
            # FAULT: on a bos_text spec the BOS text's label is forgotten the same way.
            labels, text = original(prompt_data, tokenizer, prepend_bos)
            return [(i, tok, lab) for (i, tok, _), (_, _, lab) in zip(labels, labels[1:])], text
        return token_meta_labels
    replace("fvkit.method.token_labels", "token_meta_labels", make)


def _without_bos(tokenizer) -> None:
    """``tokenizer`` adds no special tokens from now on, whatever its caller asks."""
    cls = type(tokenizer)

    def call(self, *args, **kwargs):
        return cls.__call__(self, *args, **{**kwargs, "add_special_tokens": False})

    def encode(self, *args, **kwargs):
        return cls.encode(self, *args, **{**kwargs, "add_special_tokens": False})

    tokenizer.__class__ = type(f"NoBos{cls.__name__}", (cls,), {"__call__": call, "encode": encode})


def _bos_text_dropped():
    def make_text(original):
        def bos_text_for(spec):
            return None  # FAULT: a bos_text spec's BOS text is never written before the prompt
        return bos_text_for
    replace("fvkit.method.stage_inputs", "bos_text_for", make_text)

    def make_load(original):
        def load_model(*args, **kwargs):
            lm = original(*args, **kwargs)
            if lm.spec.prepend_bos:
                _without_bos(lm.tokenizer)  # FAULT: a prepend_bos spec's tokenizer adds no BOS either
            return lm
        return load_model
    replace("fvkit.models.loader", "load_model", make_load)


def _inject_layer_off():
    def make(original):
        def inject(lm, layer, vector, position=-1):
            # FAULT: the vector goes into the block above the one asked for (the last one stays put).
            return original(lm, min(layer + 1, lm.dims.n_layers - 1), vector, position)
        return inject
    replace("fvkit.method.intervene", "inject", make)


def _inject_every_position():
    def make(original):
        def inject(lm, layer, vector, position=-1):
            return original(lm, layer, vector, slice(None))  # FAULT: added at every position
        return inject
    replace("fvkit.method.intervene", "inject", make)


def _top_heads_ascending():
    import numpy as np
    import torch

    from fvkit.method.function_vector import SCORE_DECIMALS

    def make(original):
        def select_top_heads(indirect_effect, n_top_heads):
            original(indirect_effect, n_top_heads)  # keeps the range check
            mean_ie = indirect_effect.mean(dim=0)
            # FAULT: the heads with the smallest effect are taken.
            vals, inds = torch.topk(mean_ie.view(-1), k=n_top_heads, largest=False)
            layers, heads = np.unravel_index(inds.numpy(), tuple(mean_ie.shape))
            return [[int(l), int(h), round(v.item(), SCORE_DECIMALS)] for l, h, v in zip(layers, heads, vals)]
        return select_top_heads
    replace("fvkit.method.function_vector", "select_top_heads", make)


def _labels_unshuffled():
    def make(original):
        def pairs(self, stage, i, dataset):
            trial = self.stages[stage][i]
            inputs = [dataset.rows[self.split["train"][d]]["input"] for d in trial.demos]
            outputs = [dataset.rows[self.split["train"][d]]["output"] for d in trial.demos]
            # FAULT: trial.label_order is ignored; shuffled stages keep the true labels.
            from fvkit.method.fixed_trials import QUERY_SPLIT
            q = dataset.rows[self.split[QUERY_SPLIT[stage]][trial.query]]
            return list(zip(inputs, outputs)), (q["input"], q["output"])
        return pairs
    replace_method("fvkit.method.fixed_trials", "FixedTrials", "pairs", make)


def _wrong_separator():
    from fvkit.method.prompts import DEFAULT_TEMPLATE

    # FAULT: one newline between examples instead of a blank line. The default template is
    # bound as a default argument everywhere, so its (mutable) separators dict is changed.
    DEFAULT_TEMPLATE.separators["output"] = "\n"


def _blocks_replay_only():
    """The fast path's ``auto`` strategy goes straight to the block replay, as it does for a model
    whose blocks the merged pass cannot extend (not a fault: where the next one lives)."""
    import fvkit.fast.indirect_effect as fast

    def merged_trial(lm, setup, mean_acts):
        raise fast.ReplayUnsupported("the mutation harness runs the block replay")
    fast.merged_trial = merged_trial


def _stale_fast_row():
    _blocks_replay_only()

    def make(original):
        def hidden(self, layer):
            # FAULT: the fast path's replay hands out the row recorded for the layer below.
            return original(self, max(layer - 1, 0))
        return hidden
    replace_method("fvkit.fast.replay", "BlockCalls", "hidden", make)


def _stale_merged_row():
    import fvkit.fast.merged_pass as merged_pass

    def make(original):
        def extend_argument(name, value, n, r):
            if name.startswith("position_embeddings") and isinstance(value, tuple):
                # FAULT: the rows get the rotary embedding of the prompt's first position, not its last.
                return tuple(merged_pass.torch.cat([t, t.narrow(-2, 0, 1).expand(*t.shape[:-2], r, t.shape[-1])], dim=-2)
                             for t in value)
            return original(name, value, n, r)
        return extend_argument
    replace("fvkit.fast.merged_pass", "extend_argument", make)


def _stale_model_cache():
    import fvkit.fast.indirect_effect as fast

    def make(original):
        def fast_trial(lm, setup, mean_acts, strategy="auto"):
            return original(lm, setup, mean_acts, "model")  # the whole-model strategy, where the bug is
        return fast_trial
    replace("fvkit.fast.indirect_effect", "fast_trial", make)
    # FAULT: after each layer's step the cache is not cropped back to the prompt's prefix, so the
    # next layer's step attends to the previous step's stale last-token row. Only this module's
    # name is rebound: fvkit.fast.cache's own use of drop_last stays right.
    fast.drop_last = lambda cache, n: cache


def _norm_skipped_in_decoding():
    import torch

    from fvkit.models import adapters

    def make(original):
        def vector_logits(lm, fv):
            original(lm, fv)  # keeps the size check
            head = adapters.resolve_lm_head(lm.model, lm.spec)
            with torch.no_grad():
                # FAULT: the final norm is skipped; the raw vector goes to the unembedding.
                return head(fv.reshape(1, 1, -1).to(torch.float32)).reshape(-1).float()
        return vector_logits
    replace("fvkit.report.vocab", "vector_logits", make)


def _effect_sign_flipped():
    def make(original):
        def effect(patched, clean):
            return clean - patched  # FAULT: the indirect effect's sign is flipped
        return effect
    replace("fvkit.method.head_effect", "effect", make)


def _fv_first_slot():
    import torch

    from fvkit.models import adapters

    def make(original):
        def compute_function_vector(lm, mean_acts, top_heads):
            dims = lm.dims
            width = dims.n_heads * dims.head_dim
            fv = torch.zeros(1, 1, dims.hidden_size)
            with torch.no_grad():
                for layer, head, _ in top_heads:
                    o_proj = adapters.resolve_out_proj(lm.model, lm.spec, layer)
                    x = torch.zeros(width)
                    # FAULT: the head's mean activation at the first slot, not the last.
                    x[head * dims.head_dim:(head + 1) * dims.head_dim] = mean_acts[layer, head, 0]
                    fv += o_proj(x.reshape(1, 1, width).to(lm.model.dtype))
            return fv.reshape(1, dims.hidden_size)
        return compute_function_vector
    replace("fvkit.method.function_vector", "compute_function_vector", make)


def _patch_first_token():
    def make(original):
        def head_patch(mean_acts, layer, slots, n_heads, head_dim, heads=None, first_row=0):
            import torch

            heads = torch.arange(n_heads) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
            rows = torch.arange(len(heads)) + first_row

            def fn(x):
                x = x.clone()
                view = x.view(*x.shape[:-1], n_heads, head_dim)
                for slot in slots:
                    view[rows, 0, heads] = mean_acts[layer, heads, slot].to(x.dtype)  # FAULT: first token
                return x
            return fn
        return head_patch
    replace("fvkit.method.head_effect", "head_patch", make)


def _rank_ascending():
    import torch

    def make(original):
        def token_rank(logits, target_id):
            # FAULT: ranks counted from the least likely token.
            return torch.where(torch.argsort(logits.squeeze(), descending=False) == target_id)[0].item()
        return token_rank
    replace("fvkit.method.intervene", "token_rank", make)


def _answer_token_off():
    def make(original):
        def answer_ids(tokenizer, prompt, answer):
            source = tokenizer(prompt).input_ids
            target = tokenizer(prompt + answer).input_ids
            return target[len(source) - 1:]  # FAULT: starts one token early (the prompt's last token)
        return answer_ids
    replace("fvkit.method.stage_inputs", "answer_ids", make)


FAULTS = {f.name: f for f in (
    Fault("slot_off_by_one", "token labels", "slot index map off by one: slot j reads token j+1", _slot_off_by_one),
    Fault("heads_wrong_axis", "mean activations", "heads split on the wrong axis (head_dim x n_heads)", _heads_wrong_axis),
    Fault("mean_wrong_dim", "mean activations", "multi-token word averaged over head_dim instead of its tokens",
          _mean_wrong_dim),
    Fault("bos_dropped", "token labels", "the BOS token (the tokenizer's, or the BOS text's) dropped from the labels",
          _bos_dropped),
    Fault("bos_text_dropped", "prompts", "BOS never written before the prompt: no BOS text (bos_text specs), "
          "no tokenizer BOS (prepend_bos specs)", _bos_text_dropped),
    Fault("inject_layer_off", "intervention", "vector injected one layer too high", _inject_layer_off),
    Fault("inject_every_position", "intervention", "vector injected at every position", _inject_every_position),
    Fault("top_heads_ascending", "function vector", "top heads sorted ascending (smallest effects)",
          _top_heads_ascending),
    Fault("labels_unshuffled", "fixed trials", "shuffled-label stages left unshuffled", _labels_unshuffled),
    Fault("wrong_separator", "prompts", "output separator '\\n' instead of '\\n\\n'", _wrong_separator),
    Fault("stale_fast_row", "fast indirect effect", "block replay hands each layer the layer below's recorded row",
          _stale_fast_row),
    Fault("stale_merged_row", "fast indirect effect", "merged pass gives its rows the first position's rotary embedding",
          _stale_merged_row),
    Fault("stale_model_cache", "fast indirect effect", "whole-model fast path reuses the previous step's cache row",
          _stale_model_cache),
    Fault("norm_skipped_in_decoding", "vocabulary decoding", "final norm skipped when decoding the vector",
          _norm_skipped_in_decoding),
    Fault("effect_sign_flipped", "indirect effect", "indirect effect computed as clean - patched",
          _effect_sign_flipped),
    Fault("fv_first_slot", "function vector", "vector built from the first slot's mean activation", _fv_first_slot),
    Fault("patch_first_token", "indirect effect", "head patched at the first token, not the last",
          _patch_first_token),
    Fault("rank_ascending", "evaluation", "token rank counted from the least likely token", _rank_ascending),
    Fault("answer_token_off", "prompts", "answer's first token taken one token early", _answer_token_off),
)}


def apply(name: str) -> Fault:
    if name not in FAULTS:
        raise MutationError(f"unknown fault '{name}'; known faults: {', '.join(FAULTS)}")
    fault = FAULTS[name]
    fault.install()
    return fault
