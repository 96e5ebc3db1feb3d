"""Recording what the reference actually built: draws, prompts, token data and split.

The stage modules star-import ``word_pairs_to_prompt_data`` from ``prompt_utils``;
the name is swapped in each stage module's namespace for a wrapper that records,
for the stage being run, ``create_prompt(prompt_data)`` and the draw the prompt
was built from: the demonstration pairs in prompt order (labels as the reference
permuted them) and the query pair, taken from the returned ``prompt_data``, so
they are the reference's own sampling, not a replay of it. Token labels, dummy labels
and the index map are taken from the first call of their functions in the
mean_activations stage, and the split from the row indices of the frames that
``train_test_split`` returns inside ``load_dataset``. Every swap is undone when the
``ExitStack`` given to :func:`install_recorders` closes.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Optional

from .keys import PROMPT_STAGES
from .loading import ReferenceModules

#: The stage whose first prompt M1 compares token data for.
LABEL_STAGE = "mean_activations"


def _word(text, spaced: bool) -> str:
    """A word as the dataset holds it: ``word_pairs_to_prompt_data`` prepends one space
    to every input and output (``prepend_space``, on in every stage call)."""
    text = str(text)
    return text[1:] if spaced and text.startswith(" ") else text


def prompt_draw(prompt_data: dict, spaced: bool = True) -> dict:
    """One prompt's draw: ``{"demos": [[input, output], ...], "query": [input, output]}``,
    the demonstrations in prompt order with the labels the prompt shows."""
    demos = [[_word(ex["input"], spaced), _word(ex["output"], spaced)] for ex in prompt_data.get("examples") or []]
    qt = prompt_data.get("query_target")
    query = None if qt is None else [_word(qt["input"], spaced), _word(qt["output"], spaced)]
    return {"demos": demos, "query": query}


class Recorder:
    """Collects the prompts, token labels and split the reference built, per stage."""

    def __init__(self):
        self.stage: Optional[str] = None
        self.prompts: dict = {}
        self.draws: dict = {}
        self.token_labels = None
        self.label_prompt = None
        self.dummy_labels = None
        self.idx_map = None
        self.idx_avg = None
        self.split_calls: list = []
        self.patched: list = []

    def begin(self, stage: Optional[str]) -> None:
        self.stage = stage
        if stage is not None:
            self.prompts.setdefault(stage, [])
            self.draws.setdefault(stage, [])

    def in_label_stage(self) -> bool:
        # M1 compares the first mean_activations prompt only.
        return self.stage == LABEL_STAGE

    def m1(self, tokenizer, split: Optional[dict]) -> dict:
        """The ``m1`` part of the result, in plain values (idx_map keys stay ints)."""
        token_ids = None
        if self.label_prompt is not None:
            token_ids = [int(t) for t in tokenizer(self.label_prompt).input_ids]
        return {
            "prompts": {s: self.prompts[s] for s in PROMPT_STAGES if s in self.prompts},
            "draws": {s: self.draws[s] for s in PROMPT_STAGES if s in self.draws},
            "token_labels": None if self.token_labels is None else
            [[int(i), str(tok), str(lab)] for i, tok, lab in self.token_labels],
            "token_ids": token_ids,
            "dummy_labels": None if self.dummy_labels is None else
            [[int(i), str(lab)] for i, lab in self.dummy_labels],
            "idx_map": None if self.idx_map is None else {int(a): int(b) for a, b in self.idx_map.items()},
            "idx_avg": None if self.idx_avg is None else
            {str(lab): [int(a), int(b)] for lab, (a, b) in self.idx_avg.items()},
            "split": split,
        }


def _swap(stack: contextlib.ExitStack, module: types.ModuleType, name: str, new) -> None:
    old = module.__dict__[name]
    module.__dict__[name] = new
    stack.callback(module.__dict__.__setitem__, name, old)


def _record_prompts(stack: contextlib.ExitStack, refs: ReferenceModules, rec: Recorder) -> None:
    pu = refs.prompt_utils
    make_prompt_data = pu.word_pairs_to_prompt_data
    create_prompt = pu.create_prompt

    @functools.wraps(make_prompt_data)
    def recording_prompt_data(*args, **kwargs):
        prompt_data = make_prompt_data(*args, **kwargs)
        if rec.stage is not None:
            rec.prompts[rec.stage].append(create_prompt(prompt_data))
            rec.draws[rec.stage].append(prompt_draw(prompt_data, kwargs.get("prepend_space", True)))
        return prompt_data

    # Swapped in the stage modules' namespaces only: this records stage prompts but not
    # the dummy prompt that get_dummy_token_labels builds inside prompt_utils.
    for mname, mod in refs.namespaces().items():
        if mod is not pu and mod.__dict__.get("word_pairs_to_prompt_data") is make_prompt_data:
            _swap(stack, mod, "word_pairs_to_prompt_data", recording_prompt_data)
            rec.patched.append(mname)


def _record_token_data(stack: contextlib.ExitStack, refs: ReferenceModules, rec: Recorder) -> None:
    eu = refs.extract_utils
    meta_labels, dummy, dup = eu.get_token_meta_labels, eu.get_dummy_token_labels, eu.compute_duplicated_labels

    def recording_meta_labels(*args, **kwargs):
        labels, prompt = meta_labels(*args, **kwargs)
        if rec.in_label_stage() and rec.token_labels is None:
            rec.token_labels, rec.label_prompt = labels, prompt
        return labels, prompt

    def recording_dummy(*args, **kwargs):
        labels = dummy(*args, **kwargs)
        if rec.in_label_stage() and rec.dummy_labels is None:
            rec.dummy_labels = labels
        return labels

    def recording_dup(*args, **kwargs):
        idx_map, idx_avg = dup(*args, **kwargs)
        if rec.in_label_stage() and rec.idx_map is None:
            rec.idx_map, rec.idx_avg = dict(idx_map), dict(idx_avg)
        return idx_map, idx_avg

    _swap(stack, eu, "get_token_meta_labels", recording_meta_labels)
    _swap(stack, eu, "get_dummy_token_labels", recording_dummy)
    _swap(stack, eu, "compute_duplicated_labels", recording_dup)


def _record_split(stack: contextlib.ExitStack, refs: ReferenceModules, rec: Recorder) -> None:
    split = refs.prompt_utils.train_test_split

    def recording_split(*args, **kwargs):
        parts = split(*args, **kwargs)
        rec.split_calls.append([list(p.index) for p in parts])
        return parts

    _swap(stack, refs.prompt_utils, "train_test_split", recording_split)


def _quiet_progress(stack: contextlib.ExitStack, refs: ReferenceModules) -> None:
    for mod in (refs.eval_utils, refs.compute_indirect_effect):
        if "tqdm" in mod.__dict__:
            _swap(stack, mod, "tqdm", functools.partial(mod.__dict__["tqdm"], disable=True))


def install_recorders(stack: contextlib.ExitStack, refs: ReferenceModules, rec: Recorder, progress: bool) -> None:
    """Swap the recording wrappers in (undone when ``stack`` closes); without
    ``progress`` the reference's progress bars are disabled too."""
    _record_prompts(stack, refs, rec)
    _record_token_data(stack, refs, rec)
    _record_split(stack, refs, rec)
    if not progress:
        _quiet_progress(stack, refs)
