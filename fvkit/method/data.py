"""Task datasets and the reference's train/valid/test split.

    ds = load_task_dataset("antonym")                 # datasets/antonym.json
    split = split_indices(len(ds), test_size=0.3, seed=0)
    ds.rows[split["train"][0]]                        # {"input": ..., "output": ...}

A task dataset is a JSON list of ``{"input": str, "output": str}`` objects, the
format of the reference's ``dataset_files``. The split reproduces the
reference's ``load_dataset(..., test_size, seed)`` row for row: scikit-learn's
``train_test_split`` applied twice (the first 30% split again into test and
valid), which is a ``RandomState(seed).permutation`` with ``ceil(test_size * n)``
rows taken first — computed here with numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from fvkit.errors import DataError, DataWarning

#: The repository's own datasets (used when no --data-dir is given).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "datasets"
#: Sub-folders the reference sorts its datasets into.
REFERENCE_SUBDIRS = ("abstractive", "extractive")
REQUIRED_COLUMNS = ("input", "output")


@dataclass
class TaskDataset:
    """Rows of one task, with the hash that fixed-trials files are tied to."""

    name: str
    path: str
    rows: list
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, index: int) -> tuple:
        row = self.rows[index]
        return row["input"], row["output"]


def resolve_dataset_path(name_or_path: str, data_dir: Optional[str] = None) -> Path:
    """A file path as given, or a task name looked up in ``data_dir`` the way the reference does."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        raise DataError(f"dataset '{name_or_path}' is a directory; pass a JSON file, or a task name "
                        f"with --data-dir {name_or_path}")
    if candidate.suffix == ".json" or candidate.is_file():
        if not candidate.is_file():
            raise DataError(f"dataset file '{name_or_path}' does not exist; pass an existing JSON file or a task name")
        return candidate
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    places = [root / f"{name_or_path}.json"] + [root / sub / f"{name_or_path}.json" for sub in REFERENCE_SUBDIRS]
    found = [p for p in places if p.is_file()]
    if not found:
        raise DataError(
            f"dataset '{name_or_path}' not found: looked for {', '.join(str(p) for p in places)}; "
            f"pass --dataset FILE.json or --data-dir DIR holding {name_or_path}.json"
        )
    return found[0]


def load_task_dataset(name_or_path: str, data_dir: Optional[str] = None) -> TaskDataset:
    path = resolve_dataset_path(name_or_path, data_dir)
    raw = path.read_bytes()
    try:
        rows = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"dataset {path} is not valid JSON ({err}); it must be a list of {{'input', 'output'}} objects") from None
    if not isinstance(rows, list) or not rows:
        raise DataError(f"dataset {path} must be a non-empty JSON list of {{'input': ..., 'output': ...}} objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"dataset {path}: entry {i} is {type(row).__name__}, not an object with 'input' and 'output'")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise DataError(
                f"dataset {path}: entry {i} has no {' or '.join(repr(c) for c in missing)} column "
                f"(it has {sorted(row)}); every entry needs 'input' and 'output'"
            )
        bad = [c for c in REQUIRED_COLUMNS if not isinstance(row[c], str)]
        if bad:
            raise DataError(f"dataset {path}: entry {i} column {bad[0]!r} is {type(row[bad[0]]).__name__}, expected a string")
    clean = [{"input": r["input"], "output": r["output"]} for r in rows]
    warn_duplicates(path, clean)
    return TaskDataset(name=path.stem, path=str(path), rows=clean, sha256=hashlib.sha256(raw).hexdigest())


def warn_duplicates(path, rows: list) -> None:
    """Repeated rows are usable but weigh their pair twice and can put it in train and test at once."""
    seen, repeats = {}, []
    for i, row in enumerate(rows):
        key = (row["input"], row["output"])
        if key in seen:
            repeats.append((seen[key], i))
        else:
            seen[key] = i
    if repeats:
        first, again = repeats[0]
        warnings.warn(DataWarning(
            f"dataset {path} has {len(repeats)} duplicate row(s), e.g. entry {again} repeats entry {first}; "
            f"a repeated pair can be both a demonstration and the query"), stacklevel=3)


def _shuffle_split(indices: list, test_size: float, seed: int) -> tuple:
    """scikit-learn's ``train_test_split(..., test_size, random_state=seed)`` on a list:
    returns (train, test) in the order scikit-learn returns the rows."""
    n = len(indices)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_test == 0 or n_train == 0:
        raise DataError(f"a split of {n} rows with test_size={test_size} leaves an empty part; the dataset is too small")
    perm = np.random.RandomState(seed).permutation(n)
    return [indices[i] for i in perm[n_test:]], [indices[i] for i in perm[:n_test]]


def split_indices(n_rows: int, test_size: float = 0.3, seed: int = 0) -> dict:
    """Row indices of the reference's train/valid/test split, in the reference's order."""
    if not 0.0 < test_size < 1.0:
        raise DataError(f"test_size must be between 0 and 1, got {test_size}")
    train, rest = _shuffle_split(list(range(n_rows)), test_size, seed)
    test, valid = _shuffle_split(rest, test_size, seed)
    return {"train": train, "valid": valid, "test": test}


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write a whole file or nothing: a crash never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
