"""The `train` step: train one CNN on MNIST or Fashion-MNIST and track everything in MLflow.

    python -m steps.train --epochs 5
    mlflow run . -e train -P epochs=5 --env-manager local
    python -m steps.train --resume <run_id>      # continue a FAILED or KILLED run where it stopped

A resumed run continues from its newest readable checkpoint with the settings it began with;
other flags given with --resume must match them (data_dir may differ). One process trains a run at
a time, the one holding its lease: a resume is refused while the holder may still write to the run
(on its machine the process itself is asked; elsewhere it counts as alive until it has been silent
for a minute).
"""
import contextlib
import tempfile
import time

from mnistflow import cli
from mnistflow.config import RegisterConfig, TrainConfig


def train(cfg: TrainConfig) -> None:
    # Here, not at the top: --help and a bad flag answer without loading torch or MLflow.
    import mlflow

    from mnistflow import checkpoints, data as datasets, logged_model, models, registry, report, tensorboard_log
    from mnistflow import tracking
    from mnistflow.train import fit, seed_everything, select_device, steps_per_epoch

    started = time.perf_counter()
    with contextlib.ExitStack() as lease:  # this process's hold on the run, released once the run has ended
        if cfg.resume:  # every flag checked, then the run taken before any work: one process trains it
            cfg = cfg.resumed(checkpoints.resumable_config(cfg.resume))
            lease.enter_context(checkpoints.take_for_resume(cfg.resume))
        events = tensorboard_log.EventFiles() if cfg.tensorboard else None  # no tensorboard package: stop here
        device = select_device(cfg.device)
        data = datasets.load(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.max_train_samples)
        state = checkpoints.resume_state(cfg.resume) if cfg.resume else None
        seed_everything(cfg.seed, cfg.deterministic)
        net = models.build(cfg.model, cfg.mirror)

        with tracking.step_run(f"train-{cfg.model}-{cfg.dataset}", cfg, cfg.phase, note=cfg.note, data=data,
                               continues=cfg.resume, log_system_metrics=cfg.system_metrics) as (run, log_metrics), \
                tempfile.TemporaryDirectory() as checkpoint_dir:
            run_id = run.info.run_id
            if not cfg.resume:  # a new run: taken before the step writes to it
                lease.enter_context(tracking.take_lease(run_id, new_run=True))
            if events:  # before metrics_once, so that the epochs a resume writes again reach the event files too
                log_metrics = events.tee(log_metrics)
            if cfg.resume:  # a resumed run may have logged more than its checkpoint holds
                log_metrics = checkpoints.metrics_once(run_id, state["history"] if state else [], log_metrics)
            if state is None:
                report.log_net_summary(cfg, net, device, data)
                print(f"run {run_id}: {cfg.model} ({models.count_params(net):,} params) on {cfg.dataset}, "
                      f"{len(data.train)} train / {len(data.val)} val images, device {device}", flush=True)
            else:
                print(f"run {run_id}: resuming after epoch {state['epoch']} of {cfg.epochs}", flush=True)
            if cfg.checkpoint_models:
                log_metrics = logged_model.with_checkpoint_models(net, data, log_metrics, steps_per_epoch(cfg, data))
            state = fit(cfg, net, data, device, log_metrics=log_metrics, state=state,
                        save_checkpoint=checkpoints.saver(checkpoint_dir), on_epoch_end=events and events.on_epoch_end)
            report.log_curves(state["history"])
            # The net holds the best epoch's weights: the model is that epoch's, at its last optimizer step.
            model_id = logged_model.log(net, data, step=state["best"]["epoch"] * steps_per_epoch(cfg, data))
            results = report.log_test_results(net, data, device, model_id)
            if events:
                events.close(net, data, device, state["epoch"])

    print(f"run {run_id} FINISHED in {time.perf_counter() - started:.0f} s: "
          f"test_accuracy={results['test_accuracy']:.4f} test_loss={results['test_loss']:.4f} "
          f"(best epoch {state['best']['epoch']}); tracking URI {mlflow.get_tracking_uri()}", flush=True)
    if cfg.register:  # the register step's work, in a run of its own
        registry.gate_and_promote(RegisterConfig(run_id=run_id, data_dir=cfg.data_dir).validate(), data)


def main(argv=None) -> None:
    cli.run("train", train, TrainConfig, __doc__, argv)


if __name__ == "__main__":
    main()
