"""The `plot_loss` step: a run's loss curves as one PNG, saved here and logged back to that run.

    python -m steps.plot_loss --run_id <id> [--out loss.png]
    mlflow run . -e plot_loss -P run_id=<id> --env-manager local

A train run gets its step-level `loss` and per-epoch `train_loss` / `val_loss` with the epoch
boundaries marked; a tune parent run gets every trial's `val_loss` overlaid (pruned trials are
the short lines). The PNG goes to the run as plots/loss_history.png.
"""
import argparse
import sys

from mnistflow import auth, lossplot
from mnistflow.config import ConfigError, OneLineParser


def main(argv=None) -> None:
    parser = OneLineParser(prog="plot_loss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_id", "--run-id", dest="run_id", required=True)
    parser.add_argument("--out", default="", help="where to save the PNG; default loss_<run id>.png here")
    args = parser.parse_args(argv)
    out = args.out or f"loss_{args.run_id}.png"
    try:
        auth.check_access()
        artifact = lossplot.plot_loss(args.run_id, out)
    except ConfigError as exc:
        print(f"plot_loss: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"plot_loss: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} and logged it to run {args.run_id} as {artifact}")


if __name__ == "__main__":
    main()
