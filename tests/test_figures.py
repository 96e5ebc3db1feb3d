"""The heatmap and the layer-sweep plot render to real PNGs, and refuse bad input."""

import io

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from fvkit.errors import FvkitError
from fvkit.report.figures import cie_heatmap, layer_sweep_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pixels(data: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(data), format="png")


def sweep(n_layers=4):
    topk = lambda a: [[1, a], [2, min(1, a + 0.1)], [3, min(1, a + 0.2)]]
    return {"layers": list(range(n_layers)), "n_layers": n_layers, "stages": {
        stage: {"clean_topk": topk(0.1), "intervention_topk": [topk(0.1 * (i + 1)) for i in range(n_layers)]}
        for stage in ("zero_shot", "shuffled")}}


def test_heatmap_is_a_png_and_is_written_atomically(tmp_path):
    ie = torch.linspace(-1, 1, 30 * 9).reshape(30, 9)
    path = tmp_path / "figs" / "cie_heatmap.png"
    data = cie_heatmap(ie, [[29, 8, 1.0], [0, 0, -1.0]], title="t", caption="model x; task y; 10 trials", path=path)
    assert data.startswith(PNG_MAGIC) and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == ["cie_heatmap.png"]
    img = pixels(data)
    assert img.shape[0] > img.shape[1] > 300  # 30 layers tall, 9 heads wide
    assert img[..., :3].std() > 0.1           # a picture, not a blank canvas


def test_heatmap_refuses_bad_shapes_and_heads():
    with pytest.raises(FvkitError, match="average the"):
        cie_heatmap(torch.zeros(2, 3, 4), [])
    with pytest.raises(FvkitError, match="outside the 3 x 4 heatmap"):
        cie_heatmap(torch.zeros(3, 4), [[3, 0, 0.0]])


def test_sweep_plot_is_a_png(tmp_path):
    data = layer_sweep_plot(sweep(), caption="c", baseline_top1=0.5, n_shots=10, edit_layer=2,
                            path=tmp_path / "s.png")
    assert data.startswith(PNG_MAGIC) and (tmp_path / "s.png").read_bytes() == data
    assert pixels(data)[..., :3].std() > 0.05


def test_sweep_plot_refuses_something_else():
    with pytest.raises(FvkitError, match="layer_sweep\\(\\) returns"):
        layer_sweep_plot({"zero_shot": {}})
