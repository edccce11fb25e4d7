"""The figures a run carries: confusion matrix, learning curves, misclassified images."""
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def close(figure) -> None:
    plt.close(figure)


def confusion_matrix(cm: np.ndarray, classes: list[str]):
    figure, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(cm, cmap="Blues")
    figure.colorbar(image, ax=ax)
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title="Confusion matrix (test)")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(j, i, count, ha="center", va="center", fontsize=7,
                color="white" if count > cm.max() / 2 else "black")
    figure.tight_layout()
    return figure


def curves(history: list[dict]):
    """Per-epoch train/validation loss and accuracy, side by side."""
    epochs = range(1, len(history) + 1)
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [h[f"{split}_{metric}"] for h in history], marker="o", label=split)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.set_xticks(list(epochs))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    return figure


def misclassified(images, labels: np.ndarray, preds: np.ndarray, classes: list[str], limit: int = 36):
    """A grid of up to `limit` wrongly classified images (pixels in [0, 1]), titled true -> predicted."""
    n = min(limit, len(labels))
    cols = 6
    rows = max(1, -(-n // cols))
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{classes[labels[k]]} -> {classes[preds[k]]}", fontsize=7)
    figure.suptitle(f"Misclassified test images ({len(labels)} in all; true -> predicted)")
    figure.tight_layout()
    return figure
