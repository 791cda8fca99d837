"""PNG figures of a run: training curves and the test confusion matrix.

matplotlib's object API (Figure, no pyplot), so no backend or other global state is chosen or needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CELL_TEXT_UP_TO = 20  # classes; beyond that, per-cell percentages would be unreadable


def plot_history(history: dict, path: Path, title: str = ""):
    """Loss and accuracy per epoch, training and (when present) validation."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training curves")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.25)  # fixed labels: no layout pass
    fig.savefig(path, dpi=100)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, class_names, path: Path, title: str):
    """Row-normalised confusion matrix with the class names; per-cell percentages up to 20 classes.

    The figure grows with the class count (100 classes stay readable at 0.16 inch per row).
    """
    from matplotlib.figure import Figure

    n = len(class_names)
    counts = np.zeros((n, n), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(7.0, 0.16 * n + 3)
    fontsize = 8 if n <= CELL_TEXT_UP_TO else 6
    rotation = 45 if n <= CELL_TEXT_UP_TO else 90
    fig = Figure(figsize=(side + 1, side))
    _fit_margins(fig, class_names, fontsize, rotation)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=rotation, ha="right" if rotation == 45 else "center",
                  fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= CELL_TEXT_UP_TO:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    ax.set_title(title)
    fig.savefig(path, dpi=100)


def _fit_margins(fig, class_names, fontsize: float, rotation: int):
    """Margins that fit the longest class name, measured with the font rather than by a layout pass
    (constrained layout draws the figure twice; docs/benchmarks.md, the fit loop)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure, font = TextToPath(), FontProperties(size=fontsize)
    longest = max((measure.get_text_width_height_descent(str(name), font, ismath=False)[0] for name in class_names),
                  default=0.0) / 72  # inches
    line, axis_label = 1.3 * fontsize / 72, 0.45  # a tick label's height; an axis label with its pad
    below = longest * np.sin(np.radians(rotation)) + line * np.cos(np.radians(rotation))
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=(longest + 0.1 + axis_label) / width, right=1 - 0.9 / width,
                        bottom=(below + 0.1 + axis_label) / height, top=1 - 0.45 / height)
