"""The `plot_loss` of a run: its losses drawn from its metric histories, and logged back to it.

A train run: the step-level `loss` with the per-epoch `train_loss` and `val_loss` on one step
axis, epoch boundaries marked. A tune parent run: every trial's `val_loss` per epoch, overlaid,
so pruned trials show as the short lines.
"""
import mlflow

from mnistflow import plots, tracking
from mnistflow.errors import NotFound

ARTIFACT = "plots/plot_loss.png"


def history(client: mlflow.MlflowClient, run_id: str, metric: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def trials_of(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> list:
    """The child runs of a parent run, in trial order."""
    children = client.search_runs([run.info.experiment_id], max_results=10000,
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    return sorted(children, key=lambda child: int(child.data.tags.get("trial_number", 0)))


def draw(run_id: str):
    """The figure for a run; NotFound for an unknown run or one with no loss metrics."""
    client = mlflow.MlflowClient()
    run = tracking.existing_run(run_id)
    title = f"{run.info.run_name} ({run_id[:8]})"

    trials = trials_of(client, run)
    if trials:
        curves = {f"trial {t.data.tags.get('trial_number', '?')} ({t.data.tags.get('trial_state', t.info.status)})":
                  history(client, t.info.run_id, "val_loss") for t in trials}
        curves = {label: points for label, points in curves.items() if points[0]}
        if curves:
            return plots.trial_losses(curves, title)

    epochs = {name: history(client, run_id, name) for name in ("train_loss", "val_loss")}
    steps_per_epoch = int(run.data.params.get("steps_per_epoch", 0))
    step_loss = history(client, run_id, "loss") if steps_per_epoch else ([], [])
    if not (step_loss[0] or epochs["train_loss"][0] or epochs["val_loss"][0]):
        raise NotFound(f"run {run_id} has no loss metrics (loss, train_loss, val_loss) and no trials "
                          "that have; give a train run or a tune parent run")
    return plots.run_losses(step_loss, epochs, steps_per_epoch, title)


def save_and_log(run_id: str, path: str) -> None:
    """Draw the run's plot_loss, save it at `path`, then log it to that run as ARTIFACT."""
    figure = draw(run_id)
    try:
        plots.save(figure, path)
        mlflow.MlflowClient().log_figure(run_id, figure, ARTIFACT)
    finally:
        plots.close(figure)
