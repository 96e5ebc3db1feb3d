"""Fixed trials: every random draw of every stage, written down once.

    trials = FixedTrials.make(dataset, n_trials=10, n_shots=10, seed=0)
    trials.save("datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json")
    trials = FixedTrials.load(path, dataset)          # refuses a different dataset
    demos, query = trials.pairs("indirect_effect", 0, dataset)

The draws are the ones the reference makes when each of its stage functions is
called right after ``set_seed(seed)`` with no filter set, so the reference run
on the same model sees the same prompts:

* ``mean_activations``: per trial, ``n_shots`` train rows then one valid row;
* ``indirect_effect``: the same, then a permutation of the demonstration labels;
* ``zero_shot``: every test row, no demonstrations;
* ``shuffled``: per test row, ``n_shots`` train rows then a label permutation;
* ``baseline``: per test row, ``n_shots`` train rows (clean labels).

The file format is documented in ``docs/fixed_trials.md``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fvkit.method.data import TaskDataset, atomic_write_text, split_indices
from fvkit.errors import DataError

FORMAT = "fvkit-fixed-trials/1"
STAGES = ("mean_activations", "indirect_effect", "zero_shot", "shuffled", "baseline")
#: Which split each stage draws its query from.
QUERY_SPLIT = {"mean_activations": "valid", "indirect_effect": "valid", "zero_shot": "test", "shuffled": "test", "baseline": "test"}
#: Stages whose demonstration labels are shuffled.
SHUFFLED_STAGES = ("indirect_effect", "shuffled")
#: Stages holding ``n_trials`` trials (the others hold one item per test row).
CAPPED_STAGES = ("mean_activations", "indirect_effect")


def _is_index(value) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as row 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Trial:
    """One prompt: demonstrations (train-split indices, in prompt order), a query
    (index into the stage's query split) and, for shuffled stages, the label order."""

    demos: list
    query: int
    label_order: Optional[list] = None

    def as_dict(self) -> dict:
        return {"demos": self.demos, "query": self.query, "label_order": self.label_order}


def trials_id(dataset_name: str, n_trials: int, n_shots: int, seed: int) -> str:
    return f"fixed_trials_{dataset_name}_t{n_trials}_s{n_shots}_seed{seed}"


def _draw_demos(rng, n_train: int, n_shots: int) -> list:
    return [int(i) for i in rng.choice(n_train, n_shots, replace=False)] if n_shots else []


def _draw_stage(stage: str, split: dict, n_trials: int, n_shots: int, seed: int) -> list:
    rng = np.random.RandomState(seed)  # the reference's set_seed(seed) before each stage
    n_train = len(split["train"])
    shuffle = stage in SHUFFLED_STAGES
    out = []
    if stage in ("mean_activations", "indirect_effect"):
        valid = np.arange(len(split["valid"]))
        for _ in range(n_trials):
            demos = _draw_demos(rng, n_train, n_shots)
            query = int(rng.choice(valid, 1, replace=False)[0])
            order = [int(i) for i in rng.permutation(n_shots)] if shuffle else None
            out.append(Trial(demos, query, order))
    else:
        shots = 0 if stage == "zero_shot" else n_shots
        for j in range(len(split["test"])):
            demos = _draw_demos(rng, n_train, shots)
            order = [int(i) for i in rng.permutation(shots)] if shuffle else None
            out.append(Trial(demos, j, order))
    return out


class FixedTrials:
    """The draws of all stages for one dataset, trial count, shot count and seed."""

    def __init__(self, *, dataset_name, dataset_sha256, n_rows, seed, n_trials, n_shots, test_size, split, stages, id=None):
        self.dataset_name = dataset_name
        self.dataset_sha256 = dataset_sha256
        self.n_rows = n_rows
        self.seed = seed
        self.n_trials = n_trials
        self.n_shots = n_shots
        self.test_size = test_size
        self.split = split
        self.stages = stages
        self.id = id or trials_id(dataset_name, n_trials, n_shots, seed)

    @classmethod
    def make(cls, dataset: TaskDataset, n_trials: int, n_shots: int, seed: int, test_size: float = 0.3) -> "FixedTrials":
        if n_trials < 1 or n_shots < 1:
            raise DataError(f"n_trials and n_shots must be at least 1 (got {n_trials}, {n_shots})")
        split = split_indices(len(dataset), test_size, seed)
        if n_shots > len(split["train"]):
            raise DataError(f"n_shots={n_shots} exceeds the {len(split['train'])} train rows of {dataset.name}")
        stages = {s: _draw_stage(s, split, n_trials, n_shots, seed) for s in STAGES}
        return cls(dataset_name=dataset.name, dataset_sha256=dataset.sha256, n_rows=len(dataset), seed=seed,
                   n_trials=n_trials, n_shots=n_shots, test_size=test_size, split=split, stages=stages)

    # --- file form -------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "id": self.id,
            "about": "Every random draw of every fvkit/reference stage; see docs/fixed_trials.md",
            "dataset": {"name": self.dataset_name, "sha256": self.dataset_sha256, "n_rows": self.n_rows},
            "seed": self.seed,
            "n_trials": self.n_trials,
            "n_shots": self.n_shots,
            "test_size": self.test_size,
            "split": self.split,
            "query_split": QUERY_SPLIT,
            "stages": {s: [t.as_dict() for t in trials] for s, trials in self.stages.items()},
        }

    def save(self, path) -> Path:
        path = Path(path)
        text = json.dumps(self.as_dict(), indent=1)
        # Lists of indices on one line each: a trial reads as one line of the file.
        text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
        atomic_write_text(path, text + "\n")
        return path

    @classmethod
    def load(cls, path, dataset: Optional[TaskDataset] = None) -> "FixedTrials":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"fixed-trials file '{path}' does not exist; create one with `fvkit trials`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"fixed-trials file '{path}' is not valid JSON ({err}); regenerate it with `fvkit trials`") from None
        trials = cls._from_dict(raw, path)
        if dataset is not None:
            trials.check_dataset(dataset, path)
        return trials

    @classmethod
    def _from_dict(cls, raw, path) -> "FixedTrials":
        def need(obj, key, kind, where):
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"fixed-trials file '{path}': missing field '{where}{key}'; regenerate it with `fvkit trials`")
            if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
                raise DataError(f"fixed-trials file '{path}': field '{where}{key}' must be {kind.__name__ if isinstance(kind, type) else kind}")
            return obj[key]

        def fail(message):
            raise DataError(f"fixed-trials file '{path}': {message}; regenerate it with `fvkit trials`")

        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            fail(f"'format' must be '{FORMAT}'")
        ds = need(raw, "dataset", dict, "")
        n_rows = need(ds, "n_rows", int, "dataset.")
        split = need(raw, "split", dict, "")
        for part in ("train", "valid", "test"):
            rows = need(split, part, list, "split.")
            for k, i in enumerate(rows):
                if not _is_index(i) or not 0 <= i < n_rows:
                    fail(f"split.{part}[{k}] is {i!r}, not a row index in 0..{n_rows - 1} (dataset.n_rows)")
            if not rows:
                fail(f"split.{part} is empty")
            if len(set(rows)) != len(rows):
                fail(f"split.{part} lists a row twice")
        for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
            shared = sorted(set(split[a]) & set(split[b]))
            if shared:
                fail(f"row {shared[0]} is in both split.{a} and split.{b}; a demonstration must never be a query")
        stages_raw = need(raw, "stages", dict, "")
        n_shots = need(raw, "n_shots", int, "")
        n_trials = need(raw, "n_trials", int, "")
        if n_trials < 1 or n_shots < 1:
            fail(f"'n_trials' ({n_trials}) and 'n_shots' ({n_shots}) must be at least 1")
        stages = {}
        for stage in STAGES:
            items = need(stages_raw, stage, list, "stages.")
            if not items:
                fail(f"stages.{stage} is empty, so the stage would report no result")
            if stage in CAPPED_STAGES and len(items) != n_trials:
                fail(f"'n_trials' is {n_trials} but stages.{stage} lists {len(items)} trials")
            shots = 0 if stage == "zero_shot" else n_shots
            parsed = []
            for k, item in enumerate(items):
                where = f"stages.{stage}[{k}]."
                demos = need(item, "demos", list, where)
                query = need(item, "query", int, where)
                order = item.get("label_order")
                n_demo = len(demos)
                for d in demos:
                    if not _is_index(d) or not 0 <= d < len(split["train"]):
                        fail(f"{where}demos must be train-split indices ({d!r} not in 0..{len(split['train']) - 1})")
                if n_demo != shots:
                    fail(f"{where}demos lists {n_demo} demonstrations but this stage uses {shots} "
                         f"({'none for zero-shot' if stage == 'zero_shot' else 'field n_shots'})")
                if not 0 <= query < len(split[QUERY_SPLIT[stage]]):
                    fail(f"{where}query is outside the {QUERY_SPLIT[stage]} split "
                         f"({query} not in 0..{len(split[QUERY_SPLIT[stage]]) - 1})")
                if stage in SHUFFLED_STAGES and order is None:
                    fail(f"{where}label_order is null, but stage {stage} shuffles its labels")
                if stage not in SHUFFLED_STAGES and order is not None:
                    fail(f"{where}label_order must be null: stage {stage} keeps its labels in order")
                if order is not None and (not isinstance(order, list) or not all(_is_index(o) for o in order)
                                          or sorted(order) != list(range(n_demo))):
                    fail(f"{where}label_order must be a permutation of 0..{n_demo - 1}")
                parsed.append(Trial(list(demos), query, None if order is None else list(order)))
            stages[stage] = parsed
        return cls(
            dataset_name=need(ds, "name", str, "dataset."), dataset_sha256=need(ds, "sha256", str, "dataset."),
            n_rows=n_rows, seed=need(raw, "seed", int, ""),
            n_trials=n_trials, n_shots=n_shots,
            test_size=float(need(raw, "test_size", (int, float), "")), split=split, stages=stages,
            id=need(raw, "id", str, ""),
        )

    def check_dataset(self, dataset: TaskDataset, path="<fixed trials>") -> None:
        if dataset.sha256 != self.dataset_sha256:
            raise DataError(
                f"fixed trials '{path}' were drawn from a dataset with sha256 {self.dataset_sha256[:12]}…, "
                f"but {dataset.path} has sha256 {dataset.sha256[:12]}…; use the matching dataset or regenerate "
                f"the trials with `fvkit trials --dataset {dataset.path}`"
            )
        if self.n_rows != len(dataset):
            raise DataError(f"fixed trials '{path}': dataset.n_rows is {self.n_rows} but {dataset.path} has "
                            f"{len(dataset)} rows; regenerate the trials with `fvkit trials --dataset {dataset.path}`")

    # --- use -----------------------------------------------------------------------------
    def n_items(self, stage: str) -> int:
        return len(self.stages[stage])

    def pairs(self, stage: str, i: int, dataset: TaskDataset) -> tuple:
        """(demonstration pairs with labels in prompt order, query pair) for one trial."""
        trial = self.stages[stage][i]
        inputs = [dataset.rows[self.split["train"][d]]["input"] for d in trial.demos]
        outputs = [dataset.rows[self.split["train"][d]]["output"] for d in trial.demos]
        if trial.label_order is not None:
            outputs = [outputs[k] for k in trial.label_order]
        q = dataset.rows[self.split[QUERY_SPLIT[stage]][trial.query]]
        return list(zip(inputs, outputs)), (q["input"], q["output"])

    def draws(self, dataset: TaskDataset, max_trials: Optional[int] = None) -> dict:
        """Every stage's prompts as word pairs, in the layout the reference runner records
        from the reference's own sampling: ``{stage: [{"demos": [[input, output], ...],
        "query": [input, output]}, ...]}``, demonstrations in prompt order with the labels
        the prompt shows; the trial stages hold their first ``max_trials`` trials."""
        out = {}
        for stage in STAGES:
            n = self.n_items(stage)
            if max_trials is not None and stage in CAPPED_STAGES:
                n = min(n, max_trials)
            out[stage] = []
            for i in range(n):
                demos, query = self.pairs(stage, i, dataset)
                out[stage].append({"demos": [[str(a), str(b)] for a, b in demos], "query": [str(query[0]), str(query[1])]})
        return out
