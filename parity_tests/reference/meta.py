"""Provenance of a reference run: library versions, checkout commits, settings, timings.

Everything a snapshot needs to say where its numbers came from goes into
``result["meta"]`` (the keys are listed in ``docs/reference_runner.md``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Optional

#: Libraries whose versions a run records (pandas and scikit-learn load and split the data).
VERSIONED_PACKAGES = ("transformers", "torch", "numpy", "pandas", "scikit-learn", "tokenizers")
#: Seconds a git query on a checkout may take before its state is recorded as unknown.
GIT_TIMEOUT_S = 30


def version(pkg: str) -> str:
    try:
        from importlib.metadata import version as installed_version
        return installed_version(pkg)
    except Exception:
        return "unknown"


def _git(cwd: Path, *args) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def checkout_state(path: Path, sub: str) -> dict:
    """Commit of a checkout and whether the files under ``sub`` are that commit's files.

    Blob hashes are compared file by file, because a checkout's index may be out of
    step with its files (``git status`` then reports changes that are not there).
    """
    top = _git(path, "rev-parse", "--show-toplevel")
    commit = _git(path, "rev-parse", "HEAD") if top else None
    if not commit:
        return {"commit": "unknown", "matches_commit": None}
    listing = _git(Path(top), "ls-tree", "-r", "HEAD", "--", sub) or ""
    entries = [line.split("\t", 1) for line in listing.splitlines() if "\t" in line]
    files = [(meta.split()[2], rel) for meta, rel in entries]
    if not files:
        return {"commit": commit, "matches_commit": None}
    present = [(sha, rel) for sha, rel in files if (Path(top) / rel).is_file()]
    hashes = (_git(Path(top), "hash-object", *[rel for _, rel in present]) or "").split()
    same = len(present) == len(files) and hashes == [sha for sha, _ in present]
    return {"commit": commit, "matches_commit": same}


def run_settings(lm, trials, path: Path, settings) -> dict:
    """``meta["settings"]``: what the run was given, and where the model lives."""
    param = next(lm.model.parameters())
    return {
        "trials_id": getattr(trials, "id", None), "dataset": str(path),
        "dataset_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "seed": settings.seed, "n_shots": settings.n_shots, "n_trials": int(trials.n_trials),
        "test_size": float(trials.test_size), "max_trials": settings.max_trials, "trials_used": settings.k,
        "n_top_heads": settings.n_top_heads, "edit_layer": settings.edit_layer,
        "layer_sweep": bool(settings.sweep), "dtype": str(param.dtype).replace("torch.", ""),
        "device": str(param.device),
    }


def build_meta(refs, lm, cfg, settings: dict, *, normalizations: list, recorded_in: list, unsupported: dict,
               invalid: dict, injection_probe: Optional[dict], warnings: list, timings: dict) -> dict:
    """The whole ``meta`` dict, from the run's inputs and what the run produced."""
    from fvkit.models.architectures import reference_release

    ref_state = checkout_state(refs.src, "src")
    release = reference_release(lm.spec.name)
    bk_state = checkout_state(refs.baukit_dir, refs.baukit_dir.name)
    return {
        "runner": "reference",
        "model": getattr(lm, "name", None),
        "spec": lm.spec.name,
        "versions": {p: version(p) for p in VERSIONED_PACKAGES},
        "transformers": version("transformers"),
        # The release this model's reference numbers come from (its architecture's); snapshots
        # are written only where it equals the installed one.
        "reference_transformers": release,
        "release_matches": version("transformers") == release,
        "torch": version("torch"),
        "reference_src": str(refs.src),
        "reference_commit": ref_state["commit"],
        "reference_src_matches_commit": ref_state["matches_commit"],
        "baukit_path": str(refs.baukit_dir),
        "baukit_commit": bk_state["commit"],
        "settings": settings,
        "model_config": cfg.model_config,
        "reference_branch": cfg.branch,
        "normalizations": normalizations,
        "recorded_in": recorded_in,
        "unsupported": unsupported,
        "invalid": invalid,
        "injection_probe": injection_probe,
        "warnings": warnings,
        "timings": timings,
    }
