"""The `train` step: train one CNN on MNIST or Fashion-MNIST and track everything in MLflow.

    python -m steps.train --epochs 5
    mlflow run . -e train -P epochs=5 --env-manager local
    python -m steps.train --resume <run_id>      # continue a FAILED or KILLED run where it stopped

A resumed run continues from its newest readable checkpoint with the settings it began with;
other flags given with --resume must match them (data_dir may differ). A RUNNING run is resumed
only once its process has stopped: on the same machine the process is asked; elsewhere the run
must have written nothing for twice its longest epoch (at least a minute).
"""
import argparse
import gc
import os
import sys
import tempfile
import time

import mlflow

from mnistflow import data as datasets
from mnistflow import auth, models, tracking
from mnistflow.config import ConfigError, OneLineParser, RegisterConfig, TrainConfig, add_arguments, from_args
from mnistflow.data import DataError
from mnistflow.train import fit, seed_everything, select_device, steps_per_epoch
from steps import register as register_step


def parse_config(argv=None) -> TrainConfig:
    parser = OneLineParser(prog="train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def main(argv=None) -> None:
    started = time.perf_counter()
    cfg = parse_config(argv)
    try:
        auth.check_access()
        if cfg.resume:
            cfg = cfg.resumed(tracking.resumable_config(cfg.resume))
        cfg.validate()
        data = datasets.load(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_train_samples)
        state = tracking.resume_state(cfg.resume) if cfg.resume else None
    except (ConfigError, DataError, tracking.StoreError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        sys.exit(2)

    seed_everything(cfg.seed, cfg.deterministic)
    device = select_device(cfg.device)
    net = models.build(cfg.model, cfg.mirror)
    launcher_run = os.environ.get("MLFLOW_RUN_ID")  # set when started by `mlflow run`

    with tracking.tracked_run(run_id=cfg.resume or None) as (run, log_metrics), \
            tempfile.TemporaryDirectory() as checkpoint_dir:
        run_id = run.info.run_id
        if cfg.resume and launcher_run and launcher_run != run_id:
            # `mlflow run` opened a run of its own before this step started; point it here.
            mlflow.MlflowClient().set_tag(launcher_run, "mlflow.note.content", f"resumed run {run_id}")
        mlflow.set_tags(tracking.process_tags())
        if cfg.resume:  # a resumed run may have logged more than its checkpoint holds
            log_metrics = tracking.metrics_once(run_id, state["history"] if state else [], log_metrics)
        if state is None:
            tracking.log_config(cfg)
            mlflow.log_params({
                **tracking.model_params(cfg, net, device),
                "train_size": len(data.train), "val_size": len(data.val), "test_size": len(data.test),
                "steps_per_epoch": steps_per_epoch(cfg, data),
            })
            mlflow.set_tags(tracking.run_tags(cfg.phase, cfg.dataset, cfg.note))
            tracking.log_datasets(data)
            mlflow.log_text(models.summary(net), "model_summary.txt")
            print(f"run {run_id}: {cfg.model} ({models.count_params(net):,} params) on {cfg.dataset}, "
                  f"{len(data.train)} train / {len(data.val)} val images, device {device}", flush=True)
        else:
            print(f"run {run_id}: resuming after epoch {state['epoch']} of {cfg.epochs}", flush=True)

        state = fit(cfg, net, data, device, log_metrics=log_metrics, state=state,
                    save_checkpoint=tracking.checkpoint_saver(checkpoint_dir))
        tracking.log_curves(state["history"])
        results = tracking.log_test_results(net, data, device)
        tracking.log_model(net, data)

    print(f"run {run_id} FINISHED in {time.perf_counter() - started:.0f} s: "
          f"test_accuracy={results['test_accuracy']:.4f} test_loss={results['test_loss']:.4f} "
          f"(best epoch {state['best']['epoch']}); tracking URI {mlflow.get_tracking_uri()}", flush=True)
    if cfg.register:
        # The register step's own code, in a run of its own: not the training run `mlflow run` opened.
        os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            register_step.register(RegisterConfig(run_id=run_id, data_dir=cfg.data_dir), data)
        except register_step.Refused as exc:
            print(f"train: the model was not promoted: {exc}; the registry is unchanged", file=sys.stderr)
            sys.exit(1)
    # Python's last garbage collection at exit walks every object torch and mlflow made (~3 s
    # on 2 cores); frozen objects are skipped, and the OS frees the memory anyway.
    gc.freeze()


if __name__ == "__main__":
    main()
