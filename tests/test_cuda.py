"""On a machine with a CUDA GPU: the stages on the GPU, whole or spread with CPU offload.

Skipped without CUDA. A GPU computes float32 with other kernels than the CPU, so
tensors are compared within float32 noise and heads and ranks exactly.
"""

import pytest
import torch

from fvkit.models.loader import load_model
from fvkit.pipeline import run_pipeline
from fvkit.report.vocab import decode_vector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SETTINGS = dict(n_top_heads=5, edit_layer=1, max_trials=2)

#: CPU and GPU float32 kernels sum in other orders: differences of a few float32 ulps
#: per product, growing through a few layers; 1e-4 of the largest entry is far
#: above that and far below a misplaced patch or vector (O(1)).
GPU_VS_CPU_REL_TOL = 1e-4


def rel(a, b):
    return float((a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def cpu_run(antonym, antonym_trials):
    return run_pipeline(load_model("tiny-llama"), antonym, antonym_trials, show_progress=False, **SETTINGS)


#: Budgets that split tiny-llama (embedding and output head 5.1 MB each, blocks a few kB, 10.4 MB
#: in all) between the GPU and offloaded memory. accelerate keeps room for the largest module on
#: every device, so 10.3 MB on GPU 0 holds the embedding and block 0, and the rest goes to CPU
#: memory (6 MB there) or to disk (100 kB there): maps read off accelerate's
#: infer_auto_device_map. The offloaded modules, output head included, run on the GPU through
#: accelerate's hooks, and the model's forward hands its outputs back on its input's device.
SPLIT_MAX_MEMORY = {"cpu": {0: 10_300_000, "cpu": 6_000_000}, "disk": {0: 10_300_000, "cpu": 100_000}}


@pytest.mark.parametrize("options", [
    dict(device="cuda"),
    dict(device="cuda", device_map="auto", max_memory=SPLIT_MAX_MEMORY["cpu"]),
    dict(device="cuda", device_map="auto", max_memory=SPLIT_MAX_MEMORY["disk"]),
], ids=["whole", "gpu_and_cpu", "gpu_and_disk"])
def test_gpu_run_gives_the_cpu_numbers(cpu_run, antonym, antonym_trials, options, tmp_path):
    lm = load_model("tiny-llama", parity=False, offload_dir=str(tmp_path) if "device_map" in options else None,
                    **options)
    if "device_map" in options:
        placed = lm.model.hf_device_map
        offloaded_to = "cpu" if options["max_memory"] is SPLIT_MAX_MEMORY["cpu"] else "disk"
        assert placed.get("model.layers.0") in (0, "cuda:0") and placed.get("lm_head") == offloaded_to, placed
    ours = run_pipeline(lm, antonym, antonym_trials, show_progress=False, **SETTINGS)
    for field in ("mean_activations", "indirect_effect", "function_vector"):
        assert rel(getattr(ours, field), getattr(cpu_run, field)) <= GPU_VS_CPU_REL_TOL, field
    assert ours.top_heads == cpu_run.top_heads
    for stage in ("zero_shot", "shuffled"):
        assert ours.__dict__[stage]["intervention_rank_list"] == cpu_run.__dict__[stage]["intervention_rank_list"]
    assert decode_vector(lm, ours.function_vector, k=3)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_half_precision_runs_every_stage(antonym, antonym_trials, dtype):
    lm = load_model("tiny-llama", device="cuda", dtype=dtype, parity=False)
    result = run_pipeline(lm, antonym, antonym_trials, show_progress=False, **SETTINGS)
    assert torch.isfinite(result.indirect_effect).all() and torch.isfinite(result.function_vector).all()
