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


@pytest.mark.parametrize("options", [
    dict(device="cuda"),
    dict(device="cuda", device_map="auto", max_memory={0: 6_000_000, "cpu": 10**9}),
], ids=["whole", "dispatched"])
def test_gpu_run_gives_the_cpu_numbers(cpu_run, antonym, antonym_trials, options, tmp_path):
    lm = load_model("tiny-llama", parity=False, offload_dir=str(tmp_path) if "device_map" in options else None,
                    **options)
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
