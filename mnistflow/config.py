"""The step configurations: one flat dataclass per step, its checks, and its command line.

Every field is a command-line flag (`--epochs 5`) and an MLproject parameter (`-P epochs=5`).
"""
import argparse
import dataclasses
from dataclasses import dataclass

import torch

from mnistflow.data import DATASETS
from mnistflow.models import DEFAULT_MODEL, MODELS

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("onecycle", "none")
PHASES = ("development", "tuning", "production")
DEVICES = ("auto", "cpu", "cuda", "mps")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


class ConfigError(ValueError):
    """A bad setting; the message names the value and what is allowed."""


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    model: str = DEFAULT_MODEL
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01            # the peak rate when lr_schedule is onecycle
    optimizer: str = "adamw"
    momentum: float = 0.9       # sgd only
    weight_decay: float = 0.0005
    lr_schedule: str = "onecycle"
    label_smoothing: float = 0.05
    patience: int = 0           # epochs without a better val_loss before stopping; 0 = never stop early
    seed: int = 42
    deterministic: bool = True
    device: str = "auto"
    val_fraction: float = 0.1
    max_train_samples: int = 0  # 0 = all; a small number makes a smoke run
    data_dir: str = ""          # "" = $MNISTFLOW_DATA_DIR, else torchvision's download
    log_every: int = 50         # steps between step-level `loss` metrics
    phase: str = "development"
    note: str = ""
    register: bool = False
    resume: str = ""            # a run id to continue

    def validate(self) -> "TrainConfig":
        for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("optimizer", OPTIMIZERS),
                              ("lr_schedule", LR_SCHEDULES), ("phase", PHASES), ("device", DEVICES)):
            _choose(self, name, allowed)
        for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 0), ("max_train_samples", 0),
                          ("log_every", 1), ("weight_decay", 0)):
            _at_least(self, name, low)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} is not allowed; it must be > 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} is not allowed; it must be in (0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is not allowed; it must be in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} is not allowed; it must be in [0, 1)")
        if self.device == "cuda" and not torch.cuda.is_available() or \
                self.device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"device {self.device!r} is not available on this machine; use auto or cpu")
        return self


@dataclass
class TuneConfig:
    dataset: str = "mnist"
    n_trials: int = 10          # trials this invocation adds, shared out over the workers
    timeout: int = 0            # seconds each worker may start new trials for; 0 = no limit
    epochs: int = 3             # training budget of one trial
    study_name: str = ""        # "" = "<dataset>-cnn"
    storage: str = ""           # an SQLAlchemy URL; "" = sqlite:///optuna.db in the current directory
    sampler: str = "tpe"
    pruner: str = "median"
    search_space: str = "search_space.yaml"
    workers: int = 1            # local worker processes on the same study
    seed: int = 42
    max_train_samples: int = 0  # 0 = all; a small number makes a smoke run
    data_dir: str = ""          # "" = $MNISTFLOW_DATA_DIR, else torchvision's download
    heartbeat_s: int = 30       # a trial whose worker is silent for twice this long is failed and retried

    def validate(self) -> "TuneConfig":
        _choose(self, "dataset", DATASETS)
        _choose(self, "sampler", SAMPLERS)
        _choose(self, "pruner", PRUNERS)
        for name, low in (("n_trials", 0), ("timeout", 0), ("epochs", 1), ("workers", 1),
                          ("max_train_samples", 0), ("heartbeat_s", 1)):
            _at_least(self, name, low)
        if self.n_trials < 1 and not self.timeout:
            raise ConfigError(f"n_trials={self.n_trials} with no timeout would never stop; "
                              "give n_trials >= 1 or a timeout in seconds")
        self.study_name = self.study_name or f"{self.dataset}-cnn"
        return self


def _choose(cfg, name: str, allowed) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}; choose from {', '.join(allowed)}")


def _at_least(cfg, name: str, low) -> None:
    if getattr(cfg, name) < low:
        raise ConfigError(f"{name}={getattr(cfg, name)} is not allowed; it must be >= {low}")


def parse_bool(text: str) -> bool:
    # MLflow passes every parameter as a string, so `-P register=true` arrives as "true".
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad flag in one line (not usage + error) and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    for field in dataclasses.fields(cls):
        kind = parse_bool if field.type is bool else field.type
        parser.add_argument(f"--{field.name}", type=kind, default=field.default)


def from_args(args: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
