"""The figures of ``neuroada inspect``: each function draws one PNG and returns its bytes.

matplotlib is an optional extra (``pip install 'neuroada[plots]'``), imported only here and only when a
figure is drawn. Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas,
never through pyplot, so no window, no global figure state and no display backend are involved.
"""
from __future__ import annotations

import io
import math

import numpy as np

from ..errors import UserError

DPI = 110
PANEL_COLUMNS = 4  # selection histograms: small multiples, this many per row


def _new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("neuroada inspect draws its plots with matplotlib; install it: "
                        "pip install 'neuroada[plots]'") from None
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def loss_figure(train: list[tuple[int, float]], validation: dict[str, list[tuple[int, float]]]) -> bytes:
    """Train loss by step; validation loss on the same axes; other validation metrics in a second panel."""
    val_losses = {name: points for name, points in validation.items() if "loss" in name}
    val_scores = {name: points for name, points in validation.items() if "loss" not in name}
    figure = _new_figure(10 if val_scores else 6, 3.6)
    axes = figure.subplots(1, 2 if val_scores else 1, squeeze=False)[0]
    loss_axes = axes[0]
    if train:
        steps, values = zip(*train)
        loss_axes.plot(steps, values, label="train loss", linewidth=1.2)
    for name, points in val_losses.items():
        steps, values = zip(*points)
        loss_axes.plot(steps, values, "o-", label=f"validation {name}", markersize=4)
    if not train and not val_losses:
        loss_axes.text(0.5, 0.5, "no loss recorded in train_log.jsonl", ha="center", va="center",
                       transform=loss_axes.transAxes)
    loss_axes.set_xlabel("optimizer step")
    loss_axes.xaxis.get_major_locator().set_params(integer=True)
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("loss")
    if train or val_losses:
        loss_axes.legend(fontsize="small")
    if val_scores:
        score_axes = axes[1]
        for name, points in val_scores.items():
            steps, values = zip(*points)
            score_axes.plot(steps, values, "o-", label=name, markersize=4)
        score_axes.set_xlabel("optimizer step")
        score_axes.xaxis.get_major_locator().set_params(integer=True)
        score_axes.set_title("validation metrics")
        score_axes.legend(fontsize="small")
    return _png(figure)


def _panels(count: int, width: float, height: float):
    columns = min(PANEL_COLUMNS, count)
    rows = math.ceil(count / columns)
    figure = _new_figure(width * columns, height * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes


def selection_figure(histograms: dict[str, np.ndarray], layer_counts: dict[str, int],
                     top_inputs: dict[str, list[tuple[int, float]]]) -> bytes:
    """One small panel per projection type: how many selected cells read each input feature (all layers)."""
    figure, axes = _panels(len(histograms), 3.6, 2.7)
    for ax, (group, counts) in zip(axes, histograms.items()):
        ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True)  # a polygon: no thin bar gets lost
        for index, _ in top_inputs[group][:3]:  # name the outlier features the selection piles onto
            ax.annotate(f"{index}", (index, counts[index]), fontsize=7, ha="center", va="bottom", color="tab:red")
        shares = ", ".join(f"{index}: {share:.1%}" for index, share in top_inputs[group][:3])
        ax.set_title(f"{group} ({layer_counts[group]} layers)\ntop inputs {shares} "
                     f"(even: {1 / max(len(counts), 1):.2%})", fontsize=7.5)
        ax.set_xlabel("input index", fontsize=8)
        ax.set_ylabel("selected cells", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-0.5, len(counts) - 0.5)
        ax.margins(y=0.12)
    figure.suptitle("Input features picked by the selection, summed over layers", fontsize=10)
    return _png(figure)


def selection_by_layer_figure(matrices: dict[str, tuple[list[int], np.ndarray]]) -> bytes:
    """Per projection type, layer by input index: the share of the layer's rows that read each input.

    ``matrices``: group -> (layer numbers, [layers, inputs] shares). A bright column across many layers is
    a feature the selection favours everywhere; a bright cell, an outlier of one layer.
    """
    from matplotlib.colors import PowerNorm

    figure, axes = _panels(len(matrices), 3.6, 2.7)
    for ax, (group, (numbers, shares)) in zip(axes, matrices.items()):
        image = ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="magma",
                          norm=PowerNorm(0.5, vmin=0, vmax=max(float(shares.max()), 1e-9)),
                          extent=(-0.5, shares.shape[1] - 0.5, len(numbers) - 0.5, -0.5))
        ax.set_yticks(range(len(numbers))[:: max(1, len(numbers) // 6)])
        ax.set_yticklabels([str(n) for n in numbers][:: max(1, len(numbers) // 6)])
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("input index", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        figure.colorbar(image, ax=ax, shrink=0.9).ax.tick_params(labelsize=6)
    figure.suptitle("Share of each layer's rows reading an input feature", fontsize=10)
    return _png(figure)


def layers_figure(series: dict[str, list[tuple[int, float, float]]]) -> bytes:
    """Per projection type, over layer number: the delta's norm, and the share of rows whose delta moved.

    ``series``: group -> [(layer number, delta norm, share of rows moved)].
    """
    figure = _new_figure(10, 3.6)
    norm_axes, rows_axes = figure.subplots(1, 2)
    for group, points in series.items():
        layers, norms, moved = zip(*points)
        marker = "o-" if len(points) < 40 else "-"
        norm_axes.plot(layers, norms, marker, label=group, markersize=3)
        rows_axes.plot(layers, moved, marker, label=group, markersize=3)
    norm_axes.set_title("delta norm (Frobenius) per layer")
    norm_axes.set_xlabel("layer")
    rows_axes.set_title("share of rows whose delta moved")
    rows_axes.set_xlabel("layer")
    rows_axes.set_ylim(-0.05, 1.05)
    norm_axes.legend(fontsize="x-small", ncols=2)
    for ax in (norm_axes, rows_axes):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(figure)


def confusion_figure(matrix: np.ndarray, task: str) -> bytes:
    """Counts, gold label by row and predicted label by column, each cell labelled."""
    size = max(3.2, 0.6 * len(matrix) + 2)
    figure = _new_figure(size, size * 0.85)
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    peak = matrix.max() if matrix.size else 0
    for (gold, predicted), count in np.ndenumerate(matrix):
        ax.text(predicted, gold, str(count), ha="center", va="center",
                color="white" if peak and count > peak / 2 else "black", fontsize=9)
    ticks = np.arange(len(matrix))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("gold label")
    ax.set_title(f"{task}: {int(matrix.sum())} examples", fontsize=10)
    return _png(figure)
