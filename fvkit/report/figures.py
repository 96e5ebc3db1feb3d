"""Figures of a run: the indirect-effect heatmap and the layer sweep, as PNG bytes.

    png = cie_heatmap(ie.mean(dim=0), top_heads, title="Mean indirect effect",
                      caption="smollm2-135m, present-past, 10 trials")
    layer_sweep_plot(sweep, title="Accuracy by edit layer", caption="...", path="layer_sweep.png")

matplotlib runs on its non-interactive Agg backend (no display needed). Every
function returns the PNG bytes and, given ``path``, also writes them there
atomically.
"""

from __future__ import annotations

import io
import textwrap
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fvkit.method.data import atomic_write_bytes  # noqa: E402
from fvkit.errors import FvkitError  # noqa: E402

#: Figure resolution; 110 dpi keeps a 30-layer heatmap readable and the PNG small.
DPI = 110
#: Characters per caption line before wrapping.
CAPTION_WIDTH = 110
#: Heads whose rank number is printed in their cell (more would clutter small cells).
MAX_LABELLED_HEADS = 20


def _finish(fig, caption: str, path) -> bytes:
    if caption:
        # Below everything already drawn (tick labels, axis labels), so they never overlap;
        # the tight bounding box at save time grows to take it in.
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bottom = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes) / fig.bbox.height
        wrapped = "\n".join(textwrap.wrap(caption, CAPTION_WIDTH))
        fig.text(0.01, bottom - 0.02, wrapped, ha="left", va="top", fontsize=8, color="#333333")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


def cie_heatmap(mean_ie, top_heads=(), title: str = "Mean indirect effect per attention head",
                caption: str = "", path=None) -> bytes:
    """Heatmap of the mean indirect effect, layers down and heads across, top heads boxed.

    ``mean_ie`` is an (n_layers, n_heads) tensor or array (the indirect effect
    averaged over trials); ``top_heads`` is ``[[layer, head, score], ...]`` in rank order.
    """
    values = np.asarray(mean_ie.detach().cpu() if hasattr(mean_ie, "detach") else mean_ie, dtype=float)
    if values.ndim != 2 or 0 in values.shape:
        raise FvkitError(f"cie_heatmap needs an (n_layers, n_heads) array, got shape {list(values.shape)}; "
                         f"average the (trials, layers, heads) indirect effect over trials first")
    n_layers, n_heads = values.shape
    width = min(14.0, 3.5 + 0.42 * n_heads)
    height = min(12.0, 2.6 + 0.28 * n_layers)
    fig, ax = plt.subplots(figsize=(width, height))
    bound = float(np.nanmax(np.abs(values))) or 1.0
    # Diverging colours centred on zero: heads that raise the target's probability are red,
    # those that lower it blue, so the sign is visible at a glance.
    image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound),
                      aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("mean indirect effect (change in P(target))")
    for rank, entry in enumerate(top_heads, start=1):
        layer, head = int(entry[0]), int(entry[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise FvkitError(f"top head ({layer}, {head}) is outside the {n_layers} x {n_heads} heatmap")
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
        if rank <= MAX_LABELLED_HEADS:
            dark = abs(values[layer, head]) > 0.6 * bound
            ax.text(head, layer, str(rank), ha="center", va="center", fontsize=7, fontweight="bold",
                    color="white" if dark else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.tick_params(axis="x", labelsize=7 if n_heads > 12 else 9)
    subtitle = f"{len(top_heads)} top heads boxed, numbered by rank" if len(top_heads) else ""
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    return _finish(fig, caption, path)


def layer_sweep_plot(sweep: dict, title: str = "Accuracy with the function vector added at each layer",
                     caption: str = "", path=None, baseline_top1: Optional[float] = None,
                     n_shots: Optional[int] = None, edit_layer: Optional[int] = None) -> bytes:
    """Top-1 accuracy against the edit layer, with and without the vector.

    ``sweep`` is :func:`fvkit.fast.sweep.layer_sweep`'s result. The clean
    (no-vector) accuracies do not depend on the layer and are drawn as
    horizontal lines; ``baseline_top1`` adds the clean few-shot accuracy the same way.
    """
    try:
        layers = list(sweep["layers"])
        stages = sweep["stages"]
    except (KeyError, TypeError):
        raise FvkitError("layer_sweep_plot needs the dict layer_sweep() returns (keys 'layers' and 'stages')") from None
    styles = {"zero_shot": ("zero-shot", "#1f77b4"), "shuffled": ("shuffled labels", "#d62728")}
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for stage, (label, colour) in styles.items():
        if stage not in stages:
            continue
        s = stages[stage]
        top1 = [topk[0][1] for topk in s["intervention_topk"]]
        ax.plot(layers, top1, marker="o", markersize=4, color=colour, label=f"{label} + vector (top-1)")
        top3 = [topk[2][1] for topk in s["intervention_topk"]] if len(s["intervention_topk"][0]) > 2 else None
        if top3 is not None:
            ax.plot(layers, top3, linestyle=":", color=colour, alpha=0.6, label=f"{label} + vector (top-3)")
        ax.axhline(s["clean_topk"][0][1], color=colour, linestyle="--", linewidth=1.2,
                   label=f"{label}, no vector (top-1)")
    if baseline_top1 is not None:
        shots = f"{n_shots}-shot" if n_shots else "few-shot"
        ax.axhline(baseline_top1, color="#2ca02c", linestyle="-.", linewidth=1.2,
                   label=f"clean {shots} prompt (top-1)")
    if edit_layer is not None:
        ax.axvline(edit_layer, color="#888888", linewidth=0.8, linestyle=(0, (2, 3)))
        ax.text(edit_layer, 1.02, f" default layer {edit_layer}", fontsize=7, color="#555555", va="bottom")
    ax.set_xlabel("edit layer (the vector is added to this block's output at the last token)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.08)
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _finish(fig, caption, path)
