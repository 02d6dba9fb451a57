"""The report's figures (matplotlib, headless): each function writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from xray.entity.artifact_entity import EpochRecord  # noqa: E402


def confusion_matrix_png(matrix: np.ndarray, class_names: tuple[str, ...], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4 + 0.6 * len(class_names), 3.6 + 0.6 * len(class_names)))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d"
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save(fig, path)


def roc_curves_png(
    y_true: np.ndarray, probs_by_model: dict[str, np.ndarray], class_names: tuple[str, ...], title: str, path: Path
) -> Path:
    """One panel per class (one-vs-rest), one curve per candidate."""
    shown = [1] if len(class_names) == 2 else list(range(len(class_names)))
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 4.2), squeeze=False)
    for ax, c in zip(axes[0], shown):
        positives = (y_true == c).astype(int)
        for name, probs in probs_by_model.items():
            if positives.min() != positives.max():
                RocCurveDisplay.from_predictions(positives, probs[:, c], name=name, ax=ax)
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set_title(f"{class_names[c]} vs rest")
    fig.suptitle(title)
    return _save(fig, path)


def training_curves_png(histories: dict[str, tuple[EpochRecord, ...]], path: Path) -> Path:
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in histories.items():
        epochs = [h.epoch for h in history]
        (line,) = loss_ax.plot(epochs, [h.train_loss for h in history], label=f"{name} train")
        loss_ax.plot(epochs, [h.val_loss for h in history], ls="--", c=line.get_color(), label=f"{name} val")
        auc_ax.plot(epochs, [h.val_roc_auc for h in history], c=line.get_color(), label=f"{name} AUC")
        auc_ax.plot(epochs, [h.val_accuracy for h in history], ls=":", c=line.get_color(), label=f"{name} acc")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    auc_ax.set(xlabel="epoch", ylabel="validation", title="validation ROC-AUC and accuracy")
    for ax in (loss_ax, auc_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def gallery_png(images: list[np.ndarray], captions: list[str], columns: int, title: str, path: Path) -> Path:
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def folds_png(scores: dict[str, tuple[float, ...]], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(scores)
    ax.boxplot([scores[n] for n in names], tick_labels=names)
    for i, name in enumerate(names, start=1):
        ax.scatter([i] * len(scores[name]), scores[name], s=12, c="k", zorder=3)
    ax.set(ylabel=f"validation {metric}", title="cross-validation folds")
    return _save(fig, path)


def reliability_png(curves: dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]], title: str, path: Path) -> Path:
    """One panel per split, one line per state (before / after calibration): accuracy against confidence.

    ``curves``: split -> state -> (mean confidence per bin, accuracy per bin); the diagonal is perfect calibration.
    """
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.8), squeeze=False)
    for ax, (split, states) in zip(axes[0], curves.items()):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfectly calibrated")
        for state, (confidence, accuracy) in states.items():
            ax.plot(confidence, accuracy, marker="o", label=state)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top class)", ylabel="accuracy", title=split)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
