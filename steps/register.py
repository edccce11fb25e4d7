"""The `register` step: a run's model into the registry, through the production gate, behind an alias.

    python -m steps.register                          # the best mnist run of the experiment
    python -m steps.register --run_id <id>            # a train run, or a tune parent (its best trial)
    python -m steps.register --dry_run true           # measure and report, change nothing
    python -m steps.register --rollback true          # @production back to the @previous version
    python -m steps.register --from_alias challenger  # @production onto the canary's version, through the gate
    python -m steps.register --drop_alias challenger  # end the canary
    mlflow run . -e register -P run_id=<id> --env-manager local

The gate (test accuracy, p95 single-image latency, size, the worst class's recall) and the
champion comparison are measured on the loaded model; only when all pass (or force=true) is a
version registered and the alias moved. Exit code 1: refused (also when the version already
holding the alias fails a check), registry unchanged; 2: bad input, a model that may not be
loaded (see mnistflow/logged_model.py), a champion or model name that cannot be read or used.
"""
from mnistflow import cli
from mnistflow.config import RegisterConfig
from mnistflow.errors import Refused


def register(cfg: RegisterConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch or MLflow.
    from mnistflow import registry, tracking

    if cfg.rollback:  # moves an alias, in no run of its own: the one `mlflow run` opened says so
        target, version = registry.rollback(cfg)
        tracking.describe_launcher(f"rollback-{target}", f"rolled {target} back to version {version}")
        return
    if cfg.drop_alias:  # the same
        name = cfg.with_dataset(cfg.dataset or "mnist").model_name
        version = registry.drop(name, cfg.drop_alias, "removed by register (drop_alias)")
        tracking.describe_launcher(f"drop-{name}@{cfg.drop_alias}", f"removed @{cfg.drop_alias} from version {version}")
        return
    outcome = registry.gate_and_promote(cfg)
    if outcome.refused:  # a dry run that would be refused
        raise Refused(f"{outcome.refused}; dry run: the registry is unchanged")


def main(argv=None) -> None:
    cli.run("register", register, RegisterConfig, __doc__, argv)


if __name__ == "__main__":
    main()
