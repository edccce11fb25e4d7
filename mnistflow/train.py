"""The training loop: seed, build the optimiser and schedule, run epochs, checkpoint, stop early.

`fit` knows nothing about MLflow: it reports through the `log_metrics` and `save_checkpoint`
callables it is given, so tuning, benchmarks and tests reuse the same loop.
"""
import copy
import math
import os
import random
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mnistflow.config import TrainConfig
from mnistflow.errors import ConfigError, Diverged
from mnistflow import augment
from mnistflow.data import Data, Split

EVAL_BATCH_SIZE = 1000


def select_device(name: str) -> torch.device:
    """The device a validated TrainConfig.device names; ConfigError for one this machine lacks."""
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} is not available on this machine; use auto or cpu")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        # warn_only: a rare op without a deterministic kernel warns instead of crashing a run.
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    """Stepped once per batch. `none` keeps the rate constant."""
    if cfg.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps_per_epoch(cfg: TrainConfig, data: Data) -> int:
    return -(-len(data.train) // cfg.batch_size)  # the last, partial batch counts


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last makes oneDNN's CPU convolutions about 20 % faster (bench/train_speed.py).
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict(model: nn.Module, split: Split, device: torch.device) -> torch.Tensor:
    """Logits for every image of a split, in order, on the CPU."""
    model.eval()
    return torch.cat([model(to_device(x, device)).float().cpu()
                      for x, _ in split.batches(EVAL_BATCH_SIZE)])


def evaluate(model: nn.Module, split: Split, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, logits) on a split; no label smoothing, so losses compare."""
    logits = predict(model, split, device)
    loss = nn.functional.cross_entropy(logits, split.labels).item()
    accuracy = (logits.argmax(1) == split.labels).float().mean().item()
    return loss, accuracy, logits


def snapshot(model, optimizer, scheduler, shuffle: torch.Generator) -> dict:
    """What each epoch changes: the weights, the optimiser and schedule, and every random generator."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "shuffle_rng": shuffle.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }


def restore(state: dict, model, optimizer, scheduler, shuffle: torch.Generator) -> None:
    """Put back what `snapshot` took, so training continues exactly where it stopped."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    shuffle.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def train_epoch(cfg: TrainConfig, model: nn.Module, data: Data, device: torch.device, optimizer, scheduler,
                shuffle: torch.Generator, epoch: int, log_metrics: Callable[[dict, int], None]) -> dict:
    """One pass over the training split; its train_loss, train_accuracy and images_per_s."""
    model.train()
    start = time.perf_counter()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    steps = steps_per_epoch(cfg, data)
    kinds = augment.parse(cfg.augment)
    bar = tqdm(data.train.batches(cfg.batch_size, shuffle), total=steps,
               desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, mininterval=1.0)
    for i, (x, y) in enumerate(bar):
        if kinds:
            x = augment.augment(x, kinds, fill=-data.mean / data.std, generator=shuffle)
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Report plain cross-entropy, not the label-smoothed objective, so that train and
        # validation losses compare. Sums stay on the device: .item() every step stalls a GPU.
        with torch.no_grad():
            plain_loss = nn.functional.cross_entropy(logits, y)
        loss_sum += plain_loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        step = (epoch - 1) * steps + i + 1
        if step % cfg.log_every == 0:
            loss_value = plain_loss.item()
            log_metrics({"loss": loss_value}, step)
            stop_if_diverged(epoch, loss=loss_value)  # read for the log anyway: no extra wait for a GPU
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
            "images_per_s": seen / (time.perf_counter() - start)}


def stop_if_diverged(epoch: int, **losses: float) -> None:
    """Diverged when a loss is NaN or infinite: the weights are no longer numbers, and no later
    epoch brings them back."""
    lost = ", ".join(f"{name}={value}" for name, value in losses.items() if not math.isfinite(value))
    if lost:
        raise Diverged(f"training diverged in epoch {epoch} ({lost}); no model is kept: "
                       "try a lower lr or weight_decay")


def fit(cfg: TrainConfig, model: nn.Module, data: Data, device: torch.device, *,
        log_metrics: Callable[[dict, int], None],
        save_checkpoint: Callable[[dict], None] | None = None,
        state: dict | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` for cfg.epochs, or continue from a checkpoint `state`.

    After each epoch: save a checkpoint if asked, log its metrics, and call `on_epoch_end`
    (tuning uses it to prune). Returns the final state, with the weights of the best epoch
    loaded into `model`. Diverged as soon as a loss is NaN or infinite, before that epoch is
    checkpointed.
    """
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch(cfg, data))
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if state is None:
        state = {"epoch": 0, **snapshot(model, optimizer, scheduler, shuffle),
                 "history": [],          # one dict of epoch metrics per finished epoch
                 "best": None,           # {"epoch", "val_loss", "model"} of the lowest val_loss so far
                 "stopped_early": False}
    else:
        restore(state, model, optimizer, scheduler, shuffle)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stopped_early"]:
            break
        start = time.perf_counter()
        trained = train_epoch(cfg, model, data, device, optimizer, scheduler, shuffle, epoch, log_metrics)
        val_loss, val_accuracy, _ = evaluate(model, data.val, device)
        stop_if_diverged(epoch, train_loss=trained["train_loss"], val_loss=val_loss)
        metrics = {"train_loss": trained["train_loss"], "train_accuracy": trained["train_accuracy"],
                   "val_loss": val_loss, "val_accuracy": val_accuracy, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_time_s": time.perf_counter() - start, "images_per_s": trained["images_per_s"]}
        print(f"epoch {epoch}/{cfg.epochs}  " + "  ".join(
            f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

        if state["best"] is None or val_loss < state["best"]["val_loss"]:
            state["best"] = {"epoch": epoch, "val_loss": val_loss,
                             "model": copy.deepcopy(model.state_dict())}
        bad_epochs = epoch - state["best"]["epoch"]
        state.update(epoch=epoch, **snapshot(model, optimizer, scheduler, shuffle),
                     history=state["history"] + [metrics],
                     stopped_early=bool(cfg.patience) and bad_epochs >= cfg.patience)
        # Checkpoint first, then log: a crash in between is repaired on resume from the history.
        if save_checkpoint:
            save_checkpoint(state)
        log_metrics(metrics, epoch)
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
        if state["stopped_early"]:
            print(f"early stop: val_loss has not improved for {bad_epochs} epochs", flush=True)

    model.load_state_dict(state["best"]["model"])
    return state
