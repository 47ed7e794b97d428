"""Allocation heatmaps (layers x KV heads) with matplotlib, headless.

`allocation_figure` draws the learned log_alpha (a diverging map, FA units
outlined) or the 0/1 allocation (FA black, SWA white, with a legend), layer 0 at
the bottom; `save_heatmap` writes it as a PNG (temp file, then
rename, nothing left behind on failure); `heatmap_image` returns an HWC uint8 array for TensorBoard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_consa.files import atomic_output


def allocation_figure(fa: Sequence[Sequence[int]], log_alpha: Optional[Sequence[Sequence[float]]] = None, *,
                      title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fa_arr = np.asarray(fa, dtype=float)
    layers, heads = fa_arr.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * heads + 2.5), max(3.0, 0.22 * layers + 1.5)), dpi=100)
    if log_alpha is not None:
        values = np.asarray(log_alpha, dtype=float)
        bound = max(1e-6, float(np.abs(values).max()))
        im = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest",
                       origin="lower")
        fig.colorbar(im, ax=ax, label="log_alpha")
        ys, xs = np.nonzero(fa_arr > 0)
        ax.scatter(xs, ys, marker="s", facecolors="none", edgecolors="black", s=40, linewidths=1.0, label="FA")
        marked = "FA outlined"
    else:
        from matplotlib.patches import Patch

        ax.imshow(fa_arr, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="lower")
        ax.legend(handles=[Patch(facecolor="black", edgecolor="black", label="FA"),
                           Patch(facecolor="white", edgecolor="black", label="SWA")],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        marked = "FA black"
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    step = max(1, layers // 16)
    ax.set_yticks(range(0, layers, step))
    swa = 1.0 - fa_arr.mean()
    ax.set_title(title or f"FA/SWA allocation (SWA share {swa:.3f}; {marked})", fontsize=9)
    fig.tight_layout()
    return fig


def save_heatmap(path: str | os.PathLike, fa, log_alpha=None, *, title: str = "") -> Path:
    import matplotlib.pyplot as plt

    fig = allocation_figure(fa, log_alpha, title=title)
    try:
        with atomic_output(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def heatmap_image(fa, log_alpha=None, *, title: str = "") -> np.ndarray:
    """The heatmap as an [H, W, 3] uint8 array (TensorBoard `add_image(..., dataformats="HWC")`)."""
    import matplotlib.pyplot as plt

    fig = allocation_figure(fa, log_alpha, title=title)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
