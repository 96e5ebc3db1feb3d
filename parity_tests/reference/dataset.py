"""The dataset as the reference sees it: its file, its folder layout and its split.

The reference's ``load_dataset`` wants ``<root>/abstractive/<name>.json`` and reads
the file with ``pandas.read_json``; its split is two ``train_test_split`` calls,
recorded by :mod:`.recording` and turned into row indices here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional

from fvkit.errors import DataError

from .loading import ReferenceModules
from .recording import Recorder, install_recorders

#: How many rows that differ between the reference's loaded data and the file are reported.
MISMATCH_LIMIT = 5


def dataset_file(dataset_path, trials) -> Path:
    """The dataset file, checked against the sha256 the fixed trials were drawn from."""
    path = Path(getattr(dataset_path, "path", dataset_path))
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist; pass the JSON file the fixed trials were drawn from")
    want = getattr(trials, "dataset_sha256", None)
    if want:
        have = hashlib.sha256(path.read_bytes()).hexdigest()
        if have != want:
            raise DataError(f"dataset '{path}' has sha256 {have[:12]}…, but the fixed trials were drawn from "
                            f"sha256 {want[:12]}…; pass the dataset the trials were made from")
    return path


def link_dataset(path: Path, root: Path) -> Path:
    """The reference's load_dataset wants <root>/{abstractive,extractive}/<name>.json."""
    (root / "abstractive").mkdir(parents=True, exist_ok=True)
    link = root / "abstractive" / f"{path.stem}.json"
    link.symlink_to(path.resolve())
    return link


def split_from_calls(calls: list) -> Optional[dict]:
    """Row indices of train/valid/test from the reference's two train_test_split calls:
    (train, rest) on the whole frame, then (test, valid) on the rest."""
    if len(calls) != 2:
        return None
    (train, _), (test, valid) = calls
    return {"train": [int(i) for i in train], "valid": [int(i) for i in valid], "test": [int(i) for i in test]}


def split_row_mismatches(ref_dataset: dict, rows: list, split: dict, limit: int = MISMATCH_LIMIT) -> list:
    """Rows where the reference's loaded value differs from the file's text.

    The reference reads datasets with ``pandas.read_json``, which turns an all-digit
    column into integers ('007' becomes 7), so its prompts can differ from the file.
    """
    out = []
    for part, idxs in split.items():
        for col in ("input", "output"):
            values = ref_dataset[part][col]
            for pos, (ref_value, row) in enumerate(zip(values, idxs)):
                file_value = rows[row][col]
                if str(ref_value) != file_value:
                    out.append({"split": part, "position": pos, "row": row, "column": col,
                                "reference": str(ref_value), "file": file_value})
                    if len(out) >= limit:
                        return out
    return out


def split_warnings(ds, path: Path, rec: Recorder, split: Optional[dict]) -> list:
    """Warnings about the loaded split: values pandas changed, or a split not recorded."""
    if ds is None:
        return []
    if split is None:
        return [f"expected two train_test_split calls in load_dataset, saw {len(rec.split_calls)}; "
                f"split not recorded"]
    mism = split_row_mismatches(ds, json.loads(path.read_text()), split)
    if not mism:
        return []
    return [f"the reference's loaded dataset differs from the file's text (pandas.read_json "
            f"dtype inference), first differences: {mism}"]


def reference_split(refs: ReferenceModules, dataset_path, test_size: float, seed: int) -> dict:
    """The reference's own train/valid/test split of a dataset file, as row indices,
    with rows whose loaded value differs from the file (no model needed)."""
    path = Path(dataset_path)
    rows = json.loads(path.read_text())
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="fvkit-ref-data-") as root, contextlib.ExitStack() as stack:
        link_dataset(path, Path(root))
        install_recorders(stack, refs, rec, progress=False)
        ds = refs.prompt_utils.load_dataset(path.stem, root_data_dir=root, test_size=test_size, seed=seed)
    split = split_from_calls(rec.split_calls)
    lengths = {part: len(ds[part]) for part in ("train", "valid", "test")}
    return {"split": split, "lengths": lengths,
            "row_mismatches": split_row_mismatches(ds, rows, split) if split else []}
