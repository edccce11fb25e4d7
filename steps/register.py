"""The `register` step: a run's model into the registry, through the production gate, behind an alias.

    python -m steps.register                          # the best mnist run of the experiment
    python -m steps.register --run_id <id>            # a train run, or a tune parent (its best trial)
    python -m steps.register --dry_run true           # measure and report, change nothing
    python -m steps.register --rollback true          # @production back to the @previous version
    mlflow run . -e register -P run_id=<id> --env-manager local

The gate (test accuracy, p95 single-image latency, size, the worst class's recall) and the
champion comparison are measured on the loaded model; only when all pass (or force=true) is a
version registered and the alias moved. Exit code 1: refused (also when the version already
holding the alias fails a check), registry unchanged; 2: bad input, a model that may not be
loaded (see mnistflow/inference.py), a champion or model name that cannot be read or used.
"""
import gc
import sys

import mlflow

from mnistflow import registry, tracking
from mnistflow.config import ConfigError, RegisterConfig, parse
from mnistflow.data import DataError


class Refused(Exception):
    """The gate or the champion said no; the registry was left as it was."""


def register(cfg: RegisterConfig, data=None) -> registry.Outcome:
    """Gate and promote as one tracked run; raises Refused (the run then ends FAILED)."""
    candidate = registry.prepare(cfg, data)
    cfg = candidate.cfg
    with tracking.tracked_run(run_name=f"register-{cfg.model_name}") as _:
        tracking.log_config(cfg)
        mlflow.set_tags(tracking.run_tags("production", cfg.dataset))
        outcome = registry.register(candidate)
        registry.log_outcome(outcome)
        if outcome.refused and not cfg.dry_run:
            raise Refused(outcome.refused)
    return outcome


def main(argv=None) -> None:
    cfg = parse(RegisterConfig, "register", __doc__, argv)
    try:
        if cfg.rollback:
            registry.rollback(cfg)
            return
        outcome = register(cfg)
    except (ConfigError, DataError) as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Refused as exc:
        print(f"register: refused: {exc}; the registry is unchanged", file=sys.stderr)
        sys.exit(1)
    if outcome.refused:  # a dry run that would be refused
        sys.exit(1)
    gc.freeze()  # skip the slow final garbage collection at exit (see steps/train.py)


if __name__ == "__main__":
    main()
