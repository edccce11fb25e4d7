"""The figures a run carries: confusion matrix, learning curves, misclassified images."""
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mnistflow.errors import OutputError  # noqa: E402


def close(figure) -> None:
    plt.close(figure)


def save(figure, path: str) -> None:
    """Write a figure to the file `path` (its format by the name's ending, which
    flags.unwritable_image checks first); OutputError if the file cannot be written."""
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def confusion_matrix(cm: np.ndarray, classes: list[str]):
    """scikit-learn's ConfusionMatrixDisplay: true classes down, predicted across, counts in the cells."""
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, ax = plt.subplots(figsize=(7, 6))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, cmap="Blues", values_format="d",
                                                            text_kw={"fontsize": 7})
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")  # long Fashion-MNIST names
    ax.set_title("Confusion matrix (test)")
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
    """Up to `limit` wrongly classified images (pixels in [0, 1]), each titled true -> predicted.

    Drawn as one mosaic image rather than a subplot per digit, which is ten times faster.
    """
    n, cols = min(limit, len(labels)), 6
    rows = max(1, -(-n // cols))
    band, cell = 12, 30  # a white band above each 28x28 digit holds its title
    mosaic = np.ones((rows * (band + cell), cols * cell))
    pixels = np.asarray(images[:n])
    figure, ax = plt.subplots(figsize=(cols * 1.7, rows * 2.0))
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = r * (band + cell) + band, c * cell
        mosaic[top + 1:top + 29, left + 1:left + 29] = pixels[k, 0]
        ax.text(left + cell / 2, top - 2, f"{classes[labels[k]]} -> {classes[preds[k]]}",
                ha="center", va="bottom", fontsize=6)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(f"Misclassified test images ({len(labels)} in all; true -> predicted)", fontsize=9)
    figure.tight_layout()
    return figure


def predictions(originals, readings: list, classes: list[str], titles: list[str], abstain: bool = True):
    """One row per picture: the file as given, the 28x28 inputs the model saw (one per digit
    read), and the class probabilities of a single digit or the confidence of each of a number's."""
    figure, axes = plt.subplots(len(readings), 3, figsize=(10, 2.2 * len(readings)), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 1, 3]})
    for row, (original, reading, title) in enumerate(zip(originals, readings, titles)):
        given, seen, bars = axes[row]
        given.imshow(original.convert("RGBA"))  # transparent parts show as the white page
        given.set_title(title, fontsize=8)
        seen.imshow(np.hstack(list(reading.inputs)), cmap="gray", vmin=0, vmax=1)
        seen.set_title(f"model input{'s' if len(reading.inputs) > 1 else ''} (28x28)", fontsize=8)
        for ax in (given, seen):
            ax.axis("off")
        probabilities = reading.probabilities
        if len(probabilities) == 1:  # a digit: every class's probability
            values, labels, best = probabilities[0], classes, int(probabilities[0].argmax())
        else:  # a number: each digit's confidence
            values, labels, best = probabilities.max(1), [str(int(p.argmax())) for p in probabilities], -1
        colours = ["tab:red" if abstain and value < reading.abstain_below and (best < 0 or k == best)
                   else "tab:orange" if k == best else "tab:blue" for k, value in enumerate(values)]
        bars.barh(range(len(values)), values, color=colours)
        bars.set_yticks(range(len(values)), labels, fontsize=7)
        bars.set_xlim(0, 1)
        bars.invert_yaxis()
        threshold = abstain and reading.abstain_below
        if threshold:
            bars.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
        bars.set_title(f"read {reading.answer(classes, abstain)}"
                       + (f"; dashed: unsure below {threshold:.3f}" if threshold else ""), fontsize=8)
    figure.tight_layout()
    return figure


def run_losses(step_loss: tuple[list, list], epochs: dict, steps_per_epoch: int, title: str):
    """Step-level loss and per-epoch train/val loss on one axis, with the epoch boundaries marked.

    `epochs` maps train_loss / val_loss to (epochs, values); with steps_per_epoch they are drawn at
    the last step of their epoch, else the axis counts epochs.
    """
    figure, ax = plt.subplots(figsize=(10, 4.5))
    per_epoch = steps_per_epoch or 1
    if step_loss[0]:
        ax.plot(*step_loss, color="tab:gray", alpha=0.6, linewidth=1, label="loss (every few steps)")
    for (name, (epoch_numbers, values)), color in zip(epochs.items(), ("tab:blue", "tab:orange")):
        if epoch_numbers:
            ax.plot([e * per_epoch for e in epoch_numbers], values, marker="o", color=color, label=f"{name} (per epoch)")
    last_epoch = max([0, *epochs["train_loss"][0], *epochs["val_loss"][0]])
    for epoch in range(1, last_epoch + 1):
        ax.axvline(epoch * per_epoch, color="black", alpha=0.15, linestyle="--")
    ax.set(xlabel="step" if steps_per_epoch else "epoch", ylabel="cross-entropy loss",
           title=f"Loss of {title}; dashed lines end each epoch")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    figure.tight_layout()
    return figure


def trial_losses(curves: dict, title: str):
    """Validation loss per epoch of every trial of a study: pruned trials are the short lines."""
    figure, ax = plt.subplots(figsize=(10, 5))
    for label, (epochs, values) in curves.items():
        ax.plot(epochs, values, marker="o", markersize=3, linestyle="--" if "PRUNED" in label else "-", label=label)
    last_epoch = max(max(epochs) for epochs, _ in curves.values())
    ax.set_xticks(range(1, last_epoch + 1))
    ax.set(xlabel="epoch", ylabel="validation loss", title=f"Validation loss of each trial of {title}")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(curves) > 12 else 1, loc="upper right")
    figure.tight_layout()
    return figure


def comparison(rows: list[dict]):
    """Bar charts of test accuracy, test loss, training time and parameter count, one bar per run;
    a row's `doc_accuracy`, where given, is marked on its accuracy bar."""
    panels = (("test_accuracy", "test accuracy"), ("test_loss", "test loss"),
              ("train_time_s", "training time (s)"), ("num_params", "parameters"))
    figure, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    names = [r["run"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:green"][:len(rows)])
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=7)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    expected = [(i, r["doc_accuracy"]) for i, r in enumerate(rows) if "doc_accuracy" in r]
    if expected:
        axes[0].scatter(*zip(*expected), marker="_", s=900, color="black", zorder=3, label="pipeline doc")
        axes[0].legend(fontsize=7, loc="upper left")
    if rows:
        low = min(r["test_accuracy"] for r in rows)
        axes[0].set_ylim(max(0.0, low - 0.02), 1.0)  # the differences are in the last percent
    figure.tight_layout()
    return figure


def conditions(shown: list, title: str):
    """One column per robustness condition: the picture a user's file would hold, above the 28x28
    input the model gets from it."""
    figure, axes = plt.subplots(2, len(shown), figsize=(1.3 * len(shown), 3.2), squeeze=False)
    for column, (name, given, pixels) in enumerate(shown):
        top, bottom = axes[:, column]
        top.imshow(given.convert("RGBA"))
        top.set_title(f"{name}\n{given.width}x{given.height}", fontsize=7)
        bottom.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("picture", fontsize=8)
    axes[1, 0].set_ylabel("model input", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def drift(reference, window, drifts: list, title: str):
    """One panel per monitored column: its distribution in the reference and in the window, the
    title red where it drifted. `drifts`: monitoring.Drift, one per column of the two tables."""
    figure, axes = plt.subplots(3, 4, figsize=(13, 8.5))
    for ax, found in zip(axes.flat, drifts):
        expected, seen = reference[found.column].to_numpy(float), window[found.column].to_numpy(float)
        if found.method == "Jensen-Shannon":  # few values: the share of each
            values = np.union1d(expected, seen)
            at = np.arange(len(values))
            for offset, table, label in ((-0.2, expected, "reference"), (0.2, seen, "window")):
                ax.bar(at + offset, (table[:, None] == values).mean(0), width=0.4, label=label)
            ax.set_xticks(at, [f"{v:g}" for v in values], fontsize=7)
        else:
            bins = np.histogram_bin_edges(np.concatenate([expected, seen]), bins=30)
            for table, label in ((expected, "reference"), (seen, "window")):
                ax.hist(table, bins=bins, density=True, alpha=0.5, label=label)
        ax.set_title(f"{found.column}: {found.score:.3g}", fontsize=9, color="tab:red" if found.drifted else "black")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(drifts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
