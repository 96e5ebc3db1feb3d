"""`fvkit run` end to end: the stage files, their shapes, and clean failures."""

import json
import types

import pytest
import torch

from fvkit.cli.main import main
from fvkit.pipeline import RUN_FILES, write_run_outputs

TRIALS = "datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny-gpt2"
    code = main(["run", "--model", "tiny-gpt2", "--dataset", "antonym", "--fixed-trials", TRIALS,
                 "--max-trials", "1", "--n-top-heads", "4", "--edit-layer", "1", "--out", str(out)])
    assert code == 0
    return out


def test_run_writes_every_stage_file(run_dir):
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    mean = torch.load(run_dir / "mean_activations.pt")
    ie = torch.load(run_dir / "indirect_effect.pt")
    fv = torch.load(run_dir / "function_vector.pt")
    run = json.loads((run_dir / "run.json").read_text())
    dims = run["diagnostics"]["dims"] if "dims" in run["diagnostics"] else None
    assert mean.dim() == 4 and ie.shape[0] == 1 and fv.shape[0] == 1 and fv.dim() == 2
    assert ie.shape[1:] == mean.shape[:2]
    heads = json.loads((run_dir / "top_heads.json").read_text())
    assert len(heads) == 4 and all(len(h) == 3 for h in heads)
    zs = json.loads((run_dir / "eval_zero_shot.json").read_text())
    assert len(zs["clean_rank_list"]) == len(zs["intervention_rank_list"]) == zs["n_items"]
    assert run["trials_id"] == "fixed_trials_antonym_t10_s10_seed0"
    assert {"torch", "transformers", "fvkit"} <= set(run["versions"])
    assert set(json.loads((run_dir / "timings.json").read_text())) >= {"mean_activations", "indirect_effect"}


@pytest.mark.parametrize("args,message", [
    (["--edit-layer", "7"], "layer 7 is out of range for this model: valid layers are 0..2"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--fixed-trials", "missing.json"], "does not exist"),
    (["--n-top-heads", "1000"], "outside 1.."),
])
def test_bad_input_is_one_clear_line_and_no_output(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = {"--model": "tiny-gpt2", "--dataset": "antonym", "--fixed-trials": TRIALS, "--max-trials": "1"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["run", "--out", str(out)] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("fvkit run: error:")
    assert not out.exists()


def test_out_dir_that_is_not_a_run_is_left_alone(tmp_path):
    from fvkit.errors import FvkitError
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    with pytest.raises(FvkitError, match="not an fvkit run directory"):
        write_run_outputs(types.SimpleNamespace(), tmp_path)
    assert keep.read_text() == "x"
