"""The `plot_loss` step: a run's losses as one PNG, saved here and logged back to that run.

    python -m steps.plot_loss --run_id <id> [--out loss.png]
    mlflow run . -e plot_loss -P run_id=<id> --env-manager local

A train run gets its step-level `loss` and per-epoch `train_loss` / `val_loss` with the epoch
boundaries marked; a tune parent run gets every trial's `val_loss` overlaid (pruned trials are
the short lines). The PNG goes to the run as plots/plot_loss.png.
"""
from mnistflow import cli
from mnistflow.config import PlotLossConfig


def plot_loss(cfg: PlotLossConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch or MLflow.
    from mnistflow import tracking
    from mnistflow.plot_loss import ARTIFACT, save_and_log

    save_and_log(cfg.run_id, cfg.out)
    tracking.describe_launcher(f"plot_loss-{tracking.existing_run(cfg.run_id).info.run_name}",
                               f"plotted the losses of run {cfg.run_id} as its {ARTIFACT}")
    print(f"wrote {cfg.out} and logged it to run {cfg.run_id} as {ARTIFACT}")


def main(argv=None) -> None:
    cli.run("plot_loss", plot_loss, PlotLossConfig, __doc__, argv)


if __name__ == "__main__":
    main()
