import copy
import dataclasses

import pytest
import torch

from mnistflow import data, models
from mnistflow.config import TrainConfig
from mnistflow.errors import ConfigError, Diverged
from mnistflow.train import fit, seed_everything, select_device

CPU = torch.device("cpu")


def train(cfg, dataset, state=None, checkpoints=None, logged=None):
    cfg.validate()  # resolves model=auto
    seed_everything(cfg.seed, cfg.deterministic)
    net = models.build(cfg.model, cfg.mirror)
    save = (lambda s: checkpoints.append(copy.deepcopy(s))) if checkpoints is not None else None
    log = (lambda metrics, step: logged.append((step, metrics))) if logged is not None else (lambda m, s: None)
    state = fit(cfg, net, dataset, CPU, log_metrics=log, state=state, save_checkpoint=save)
    return net, state


@pytest.fixture(scope="module")
def tiny(tiny_data):
    return data.load("mnist", tiny_data, seed=0)


def test_fit_learns_and_logs_every_epoch(tiny):
    cfg = TrainConfig(model="baseline", epochs=3, batch_size=32, lr=0.003, log_every=5)
    logged = []
    _, state = train(cfg, tiny, logged=logged)
    epochs = [(step, m) for step, m in logged if "val_loss" in m]
    assert [step for step, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                                 "epoch_time_s", "images_per_s"}
    steps = [step for step, m in logged if "loss" in m and "val_loss" not in m]
    assert steps == list(range(5, 3 * 17 + 1, 5))  # 540 images / 32 = 17 steps per epoch
    assert state["history"][-1]["val_accuracy"] > 0.9
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"]


def test_same_seed_same_result(tiny):
    cfg = TrainConfig(epochs=2, batch_size=64)
    _, a = train(cfg, tiny)
    _, b = train(cfg, tiny)
    assert a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]


# mirror and every augmentation on: the random mirror images and distortions must repeat too
@pytest.mark.parametrize("mirror, augment", [("off", "none"), ("on", "shift,affine,stroke,elastic")])
def test_resume_from_checkpoint_matches_uninterrupted_training(tiny, mirror, augment):
    cfg = TrainConfig(epochs=3, batch_size=64, mirror=mirror, augment=augment)
    checkpoints = []
    full_net, full = train(cfg, tiny, checkpoints=checkpoints)
    assert [c["epoch"] for c in checkpoints] == [1, 2, 3]
    resumed_net, resumed = train(cfg, tiny, state=checkpoints[0])
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in full["history"]]
    for a, b in zip(full_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_keeps_the_best_epoch(tiny):
    # Validation labels shuffled: the more the net learns the training set, the worse its val_loss.
    shuffled = tiny.val.labels[torch.randperm(len(tiny.val), generator=torch.Generator().manual_seed(0))]
    noisy = dataclasses.replace(tiny, val=data.Split(tiny.val.images, shuffled, tiny.val.indices, "shuffled"))
    cfg = TrainConfig(model="baseline", epochs=8, batch_size=32, lr=0.001, lr_schedule="none",
                      label_smoothing=0.0, patience=2)
    net, state = train(cfg, noisy)
    assert state["stopped_early"]
    assert len(state["history"]) < 6
    best = state["best"]["epoch"]
    assert len(state["history"]) == best + 2
    assert torch.equal(net.state_dict()["4.weight"], state["best"]["model"]["4.weight"])


# Caught in the loss read for the step-level log, or else in the epoch's.
@pytest.mark.parametrize("log_every, loss", [(1, "loss"), (50, "train_loss")])
def test_a_loss_that_is_no_longer_a_number_stops_fit_before_its_epoch_is_kept(tiny, log_every, loss):
    # Within the config's limits, yet far too fast for this net: its weights overflow in the first epoch.
    cfg = TrainConfig(model="simple", optimizer="sgd", lr=10, lr_schedule="none", epochs=2, batch_size=64,
                      log_every=log_every)
    checkpoints, logged = [], []
    with pytest.raises(Diverged, match=rf"training diverged in epoch 1 \({loss}=(nan|inf)"):
        train(cfg, tiny, checkpoints=checkpoints, logged=logged)
    assert checkpoints == [] and not [metrics for _, metrics in logged if "val_loss" in metrics]


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs=0 is not allowed; it must be >= 1"),
    ({"lr": -0.1}, "lr=-0.1 is not allowed; it must be in (0, 10]"),
    ({"model": "resnet"}, "unknown model 'resnet'; choose from auto, fast, wide, baseline"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'; choose from mnist, fashion_mnist"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; choose from adamw, adam, sgd"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 is not allowed; it must be in (0, 1)"),
    ({"val_fraction": 0}, "val_fraction=0 is not allowed; it must be in (0, 1)"),
    ({"mirror": "sideways"}, "unknown mirror 'sideways'; choose from auto, on, off"),
    ({"augment": "diagonal"}, "augment 'diagonal' is not allowed; give auto, none, or some of shift, affine, stroke, "
                              "elastic joined by commas, each once"),
    ({"augment": "affine,affine"}, "augment 'affine,affine' is not allowed"),
    ({"augment": "none,shift"}, "augment 'none,shift' is not allowed"),
])
def test_bad_config_names_value_and_allowed(change, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**change).validate()
    assert message in str(err.value)


def test_auto_settings_resolve_by_dataset_and_explicit_ones_stay():
    fashion, digits = TrainConfig(dataset="fashion_mnist").validate(), TrainConfig(dataset="mnist").validate()
    assert (fashion.model, fashion.mirror, fashion.augment) == ("wide", "on", "none")
    assert (digits.model, digits.mirror, digits.augment) == ("fast", "off", "affine")
    explicit = TrainConfig(dataset="mnist", model="wide", mirror="on", augment="none").validate()
    assert (explicit.model, explicit.mirror, explicit.augment) == ("wide", "on", "none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_refused():
    with pytest.raises(ConfigError, match="device 'cuda' is not available on this machine; use auto or cpu"):
        select_device("cuda")


def test_resume_continues_with_the_runs_own_settings_and_refuses_other_ones():
    logged = dataclasses.asdict(TrainConfig(epochs=3, lr=0.02, data_dir="/old").validate())
    # What `mlflow run -P resume=<id>` passes: every other flag at its default.
    resumed = TrainConfig(resume="abc").resumed(logged)
    assert (resumed.epochs, resumed.lr, resumed.model, resumed.resume, resumed.data_dir) == (3, 0.02, "fast", "abc", "/old")
    assert TrainConfig(resume="abc", epochs=3, data_dir="/new").resumed(logged).data_dir == "/new"
    # The one-cycle schedule and the logged params are fixed to 3 epochs: no silent extension.
    with pytest.raises(ConfigError, match=r"epochs=8 cannot be given with resume: the run was started with epochs=3"):
        TrainConfig(resume="abc", epochs=8).resumed(logged)
    with pytest.raises(ConfigError, match=r"optimizer='sgd' cannot be given with resume"):
        TrainConfig(resume="abc", optimizer="sgd").resumed(logged)
    with pytest.raises(ConfigError, match="settings the train step does not know \\(n_trials, study_name\\)"):
        TrainConfig(resume="abc").resumed({**logged, "n_trials": 10, "study_name": "s"})
