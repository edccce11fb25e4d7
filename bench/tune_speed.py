"""Does pruning pay? Finished trials per wall-minute of the tune step, with and without a pruner.

    python bench/tune_speed.py --data_dir ../shared/data [--pruner hyperband] [--minutes 8] [--epochs 9]

Two studies on the same real data, search space and sampler seed, one with no pruner and one
with the pruner under test, each given the same wall-clock budget. Their trials alternate one
for one, so the noise of a shared machine falls on both alike. Both run the tune step's own
trial code (`tuning.objective`: a nested MLflow run per trial, the real training loop).

Prints finished (complete or pruned) trials per minute and the best validation accuracy of
each study, and their ratio (goal: >= 2x at a best accuracy within 0.2 points).
"""
import no_telemetry  # noqa: F401  (first: before anything imports MLflow)
import argparse
import tempfile
import time

import mlflow
import optuna

from mnistflow import tuning
from mnistflow.config import TuneConfig
from mnistflow.errors import StepError
from mnistflow.flags import OneLineParser


def main() -> None:
    parser = OneLineParser(prog="tune_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--pruner", default="hyperband", choices=["median", "hyperband"])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of each study")
    parser.add_argument("--epochs", type=int, default=9, help="training budget of one trial")
    parser.add_argument("--train_samples", type=int, default=12000, help="real images per trial (0 = all)")
    parser.add_argument("--search_space", default="search_space.yaml")
    args = parser.parse_args()
    if not 0 < args.minutes <= 24 * 60:  # not inf either: the studies would never end
        parser.error(f"--minutes {args.minutes:g} is not allowed; it must be in (0, 1440]")
    if args.train_samples < 0:
        parser.error(f"--train_samples {args.train_samples} is not allowed; it must be >= 0 (0 = all)")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # the settings, search space and data checked before anything is written
        configs = {pruner: TuneConfig(dataset=args.dataset, epochs=args.epochs, pruner=pruner, study_name=pruner,
                                      max_train_samples=args.train_samples, data_dir=args.data_dir).validate()
                   for pruner in ("none", args.pruner)}
        space = tuning.load_search_space(args.search_space)
        data = tuning.load_data(configs["none"])
    except StepError as exc:
        parser.error(str(exc))
    tmp = tempfile.mkdtemp(prefix="tune-bench-")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    for cfg in configs.values():
        cfg.storage = f"sqlite:///{tmp}/optuna.db"
    studies = {pruner: tuning.open_study(cfg, tuning.open_storage(cfg)) for pruner, cfg in configs.items()}
    spent = dict.fromkeys(configs, 0.0)
    budget = 60 * args.minutes

    with mlflow.start_run(run_name="tune-bench") as parent:
        while min(spent.values()) < budget:
            for pruner, study in studies.items():
                if spent[pruner] >= budget:
                    continue
                start = time.perf_counter()
                study.optimize(lambda trial: tuning.objective(trial, configs[pruner], space, data, parent),
                               n_trials=1, catch=(Exception,))
                spent[pruner] += time.perf_counter() - start
                trial = study.trials[-1]
                print(f"[{pruner}] trial {trial.number} {trial.state.name} after "
                      f"{len(trial.intermediate_values)} epochs, {spent[pruner] / 60:.1f} of "
                      f"{args.minutes:g} min", flush=True)

    rows = {}
    print(f"\n{args.dataset}, {len(data.train)} train / {len(data.val)} val images, {args.epochs} epochs per trial, "
          f"{args.minutes:g} min each\n")
    print(f"{'pruner':<10}{'finished':>9}{'complete':>9}{'pruned':>8}{'minutes':>9}{'trials/min':>12}{'best val_acc':>14}")
    for pruner, study in studies.items():
        states = [t.state for t in study.trials]
        finished = states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED)
        rows[pruner] = (finished / (spent[pruner] / 60), study.best_value)
        print(f"{pruner:<10}{finished:>9}{states.count(optuna.trial.TrialState.COMPLETE):>9}"
              f"{states.count(optuna.trial.TrialState.PRUNED):>8}{spent[pruner] / 60:>9.1f}"
              f"{rows[pruner][0]:>12.2f}{rows[pruner][1]:>14.4f}")
    ratio = rows[args.pruner][0] / rows["none"][0]
    gap = 100 * (rows[args.pruner][1] - rows["none"][1])
    print(f"\ntrials per minute, {args.pruner} / none: {ratio:.2f}x (goal >= 2)")
    print(f"best val accuracy, {args.pruner} - none: {gap:+.2f} points (goal: within 0.2, or better)")


if __name__ == "__main__":
    main()
