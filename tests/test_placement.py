"""Device, dtype and placement choices: their checks, and fvkit's tensors on the module's device.

This machine has no GPU, so a second device is stood in for by accelerate's own
record of where a module computes (its hook's ``execution_device``): what fvkit
hands a module must follow that record, not the CPU it was made on.
"""

import types

import pytest
import torch

from fvkit.cli.device_options import placement_kwargs, thread_count, using_threads
from fvkit.errors import FvkitError
from fvkit.method import function_vector
from fvkit.models import placement
from fvkit.models.loader import load_model
from fvkit.models.placement import Placement, dtype_name, parse_max_memory


@pytest.mark.parametrize("spelling,name", [("float32", "fp32"), ("fp32", "fp32"), ("torch.bfloat16", "bf16"),
                                           ("BF16", "bf16"), ("float16", "fp16"), ("half", "fp16")])
def test_dtype_spellings(spelling, name):
    assert dtype_name(spelling) == name


def test_max_memory_text():
    assert parse_max_memory("0=20GiB, cuda:1=18GB ,cpu=60GiB,disk=1000") == \
        {0: "20GiB", 1: "18GB", "cpu": "60GiB", "disk": 1000}


@pytest.mark.parametrize("text,message", [("20GiB", "is not DEVICE=SIZE"), ("gpu0=1GB", "names device 'gpu0'"),
                                          ("0=lots", "is not DEVICE=SIZE"), (",", "is empty")])
def test_bad_max_memory(text, message):
    with pytest.raises(FvkitError, match=message):
        parse_max_memory(text)


@pytest.mark.parametrize("options,message", [
    (dict(max_memory="cpu=1GB"), "add --device-map auto"),
    (dict(offload_dir="/tmp/x"), "add --device-map auto"),
    (dict(device_map="everywhere"), "unknown --device-map 'everywhere'"),
    (dict(quant="3bit"), "unknown quant '3bit'"),
    (dict(device_map="auto", max_memory=f"{torch.cuda.device_count()}=1GB,cpu=1GB"),
     f"gives memory to GPU {torch.cuda.device_count()}, but "),
])
def test_bad_placement_is_one_message(options, message):
    with pytest.raises(FvkitError, match=message):
        Placement.from_options(**options).check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_but_absent():
    with pytest.raises(FvkitError, match="device 'cuda:0' is not available on this machine.*use --device cpu"):
        Placement.from_options(device="cuda:0").check()


def test_quantization_needs_cuda_when_bitsandbytes_is_there(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    with pytest.raises(FvkitError, match="--quant 8bit runs bitsandbytes' CUDA kernels; add --device cuda"):
        Placement.from_options(quant="8bit").check()


def test_half_precision_without_kernels_is_refused(monkeypatch):
    def no_half(x, w, b=None):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.raises(FvkitError, match="--dtype fp16 is not supported on device 'cpu'.*use --dtype float32"):
        Placement.from_options(dtype="float16").check()


def test_offload_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FvkitError, match="is a file"):
        Placement.from_options(device_map="auto", offload_dir=str(tmp_path / "f")).check()


def test_parity_refuses_a_device_map():
    with pytest.raises(FvkitError, match="parity mode runs the whole model on cpu; got device_map=auto"):
        load_model("tiny-llama", device_map="auto")


# --- fvkit run's options ------------------------------------------------------------------

def _args(**given):
    names = ("device", "dtype", "quant", "device_map", "max_memory", "offload_dir")
    return types.SimpleNamespace(**{name: given.get(name) for name in names})


def test_no_option_is_the_parity_setting():
    assert placement_kwargs(_args()) == dict(device="cpu", dtype="fp32", quant="none", device_map=None,
                                             max_memory=None, offload_dir=None, parity=True)
    assert placement_kwargs(_args(device="cpu", dtype="float32"))["parity"] is True


def test_any_placement_option_leaves_parity_mode():
    kwargs = placement_kwargs(_args(dtype="bfloat16"))
    assert kwargs["parity"] is False and kwargs["dtype"] == "bf16"
    assert placement_kwargs(_args(device_map="auto"))["parity"] is False


def test_threads_default_to_every_core_and_come_back():
    before = torch.get_num_threads()
    assert thread_count(None) >= 1 and thread_count(3) == 3
    with using_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(FvkitError, match="--threads must be at least 1"):
        thread_count(0)


# --- Where modules compute ----------------------------------------------------------------

class _Hook:
    def __init__(self, device):
        self.execution_device = device


def test_module_device_follows_accelerates_record():
    linear = torch.nn.Linear(2, 2)
    assert placement.module_device(linear) == torch.device("cpu")
    linear._hf_hook = _Hook(0)   # accelerate writes a GPU as its index
    assert placement.module_device(linear) == torch.device("cuda:0")
    linear._hf_hook = _Hook("meta")
    assert placement.module_device(linear) == torch.device("meta")
    assert placement.module_device(torch.nn.ReLU()) == torch.device("cpu")
    assert placement.module_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16


class _RecordingProjection(torch.nn.Module):
    """An out-projection that records what it is handed; it "computes" on the meta device in bfloat16."""

    def __init__(self, width, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden, width, dtype=torch.bfloat16), requires_grad=False)
        self._hf_hook = _Hook(torch.device("meta"))
        self.seen = []

    def forward(self, x):
        self.seen.append((x.device, x.dtype))
        return torch.ones(*x.shape[:-1], self.weight.shape[0], dtype=torch.bfloat16)


def test_function_vector_input_is_made_on_the_projections_device(monkeypatch):
    dims = types.SimpleNamespace(n_layers=1, n_heads=2, head_dim=3, hidden_size=4)
    proj = _RecordingProjection(6, 4)
    lm = types.SimpleNamespace(dims=dims, spec=None, model=types.SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(function_vector.adapters, "resolve_out_proj", lambda model, spec, layer: proj)
    fv = function_vector.compute_function_vector(lm, torch.ones(1, 2, 5, 3), [[0, 1, 0.5]])
    assert proj.seen == [(torch.device("meta"), torch.bfloat16)]
    assert fv.dtype == torch.float32 and fv.device.type == "cpu" and torch.equal(fv, torch.ones(1, 4))


class _Embedding(torch.nn.Embedding):
    pass


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _Embedding(5, 2)
        self.seen = None

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None):
        self.seen = (input_ids.device, attention_mask.device)
        return input_ids


def test_inputs_follow_a_model_placed_on_another_device():
    model = _TinyModel()
    assert placement.follow_model_inputs(model) is None   # a CPU model gets no hook: parity runs untouched
    model.embed._hf_hook = _Hook(torch.device("meta"))
    handle = placement.follow_model_inputs(model)
    model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2))
    assert model.seen == (torch.device("meta"), torch.device("meta"))
    handle.remove()


# --- fvkit run ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--max-memory", "cpu=1GB"], "add --device-map auto"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--quant", "4bit"], "4bit"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "device 'cuda' is not available")]))
def test_run_refuses_a_bad_placement_before_any_work(tmp_path, capsys, args, message):
    from fvkit.cli.main import main

    out = tmp_path / "out"
    assert main(["run", "--model", "tiny-gpt2", "--max-trials", "1", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("fvkit run: error:")
    assert not out.exists() and not any(tmp_path.iterdir())


def test_run_json_says_where_the_model_ran(zoo_model):
    d = zoo_model("tiny-gpt2").diagnostics()   # run.json's "diagnostics"
    assert (d["device"], d["dtype"], d["quant"], d["device_map"]) == ("cpu", "fp32", "none", None)
    assert d["threads"] == torch.get_num_threads()
    assert all(layer["out_proj_device"] == "cpu" for layer in d["layers"])
