"""The step configurations: one flat dataclass per step, each setting's default and meaning, and
its checks.

Every field is a command-line flag (`--epochs 5`, its meaning in `--help`) and an MLproject
parameter (`-P epochs=5`); docs/parameters.md's tables are written from these fields
(`python -m mnistflow.config docs/parameters.md`).
"""
import dataclasses
import ipaddress
import math
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass

from mnistflow import nginx
from mnistflow.errors import ConfigError
from mnistflow.flags import like, markdown_table, setting, unwritable, unwritable_image

# The names of data.DATASETS and models.MODELS, written here so that reading flags imports no
# PyTorch (tests/test_config.py keeps them equal).
DATASETS = ("mnist", "fashion_mnist")
MODELS = ("fast", "wide", "baseline", "enhanced", "cnn_bn", "simple")
AUGMENTATIONS = ("shift", "affine", "stroke", "elastic")  # augment.KINDS
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("onecycle", "none")
PHASES = ("development", "tuning", "production")
DEVICES = ("auto", "cpu", "cuda", "mps")
SWITCHES = ("auto", "on", "off")
# What the "auto" settings become on each dataset (measured in docs/results.md):
# - model: the net with the best test accuracy per second of CPU training that reaches the
#   dataset's goal in 5 epochs (99.5 % on MNIST, 93 % on Fashion-MNIST);
# - mirror: on where a mirror image keeps its label: clothes and shoes, not digits (a mirrored 2
#   is no digit);
# - augment: on digits, what most raises the accuracy on digits unlike MNIST's own
#   (bench/robustness.py) while keeping 99.5 % on its test set in 5 epochs; clothes lose accuracy
#   to shifts in 5 epochs, so none there.
AUTO = {
    "mnist": {"model": "fast", "mirror": "off", "augment": "affine"},
    "fashion_mnist": {"model": "wide", "mirror": "on", "augment": "none"},
}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
LAUNCHERS = ("local", "slurm")
ALIAS = re.compile(r"[A-Za-z0-9_-]+")
# Registered model and metric names as MLflow allows them, less the quotes and backticks that
# would end the filter strings they are put into.
MODEL_NAME = re.compile(r"\w[\w.\- ]*")
METRIC = re.compile(r"[\w./\- :]+")
# Upper limits, where a larger number breaks something rather than only taking longer.
MAX_LR = 10.0                # far above any rate that trains these nets (fit stops a run that diverges)
MAX_WEIGHT_DECAY = 1.0       # beyond it the decay outweighs the data whatever the rate
SEEDS = 2**32                # numpy and Optuna's samplers take seeds in [0, 2**32)
MAX_HEARTBEAT_S = 86_400     # a day; a wait longer than threading allows ends Optuna's heartbeat thread silently
MAX_WORKERS = 1000           # Slurm's default MaxArraySize allows 1001 tasks; as many local processes would thrash
MAX_SERVE_WORKERS = 32      # model processes of one version; each holds the model and a Python
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
NOTE_MAX = 6000              # MLflow's longest param value: `mlflow run` logs -P note=... as one
STUDY_NAME_MAX = 512         # the study_name column of Optuna's RDB storage (tests/test_config.py keeps them equal)
# The Optuna storage URL when it holds a password: read by the tune step, never logged or printed.
STORAGE_ENV = "MNISTFLOW_OPTUNA_STORAGE"

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def is_host(text: str) -> bool:
    """Whether `text` is a host name (dot-separated labels of letters, digits and '-') or an IP address:
    nothing a config file or URL it is written into would read as more than a host."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return len(text) <= 253 and bool(HOST_NAME.fullmatch(text))
    return getattr(ip, "scope_id", None) is None  # an IPv6 zone ("%eth0") may hold any character


# Per dataset: the model name it is registered under and the production gate's default limits,
# the one place they are written (docs/registry.md is checked against them). Fashion-MNIST's shirt
# class is hard for every small CNN (its recall stays far below the others'), so its margin is
# wider; MNIST's digits are all easy. min_robust_accuracy: the accuracy asked of the worst
# condition of bench/robustness.py; the MNIST default net scores about 90 % there after 5 epochs,
# 88 % after one. Fashion-MNIST's worst (an 8x8 thumbnail of a garment) is far lower for every net.
REGISTRY_DEFAULTS = {
    "mnist": {"model_name": "MNIST_CNN", "min_accuracy": 0.99, "recall_margin": 0.03, "min_robust_accuracy": 0.85},
    "fashion_mnist": {"model_name": "FashionMNIST_CNN", "min_accuracy": 0.90, "recall_margin": 0.25,
                      "min_robust_accuracy": 0.50},
}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# min_robust_accuracy's "take the dataset's default" (REGISTRY_DEFAULTS)
DATASET_DEFAULT = -1.0


# The meanings below are made from the lists above, so that they say what the checks allow.
def _one_of(names) -> str:
    """`a`, `b` or `c`"""
    quoted = [f"`{name}`" for name in names]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _auto(name: str) -> str:
    """What `auto` means for setting `name` of TrainConfig: its value by dataset (AUTO)."""
    return "`auto` = " + ", ".join(f"`{AUTO[dataset][name]}` for `{dataset}`" for dataset in DATASETS)


def _per_dataset(name: str, shown: str = "{:.2f}") -> str:
    """The gate's default for setting `name` on each dataset, as `shown` writes it (REGISTRY_DEFAULTS)."""
    return " or ".join(f"{shown.format(REGISTRY_DEFAULTS[dataset][name])} ({TITLES[dataset]})" for dataset in DATASETS)


@dataclass
class TrainConfig:
    dataset: str = setting("mnist", _one_of(DATASETS))
    model: str = setting("auto", f"{_one_of(MODELS)} (see [the models](train.md#models)); {_auto('model')}")
    epochs: int = setting(5, "passes over the training split")
    batch_size: int = setting(128, "images per step")
    lr: float = setting(0.01, "peak rate of the one-cycle schedule, or the constant rate with `lr_schedule=none`; "
                              f"in (0, {MAX_LR:g}]")
    optimizer: str = setting("adamw", f"{_one_of(OPTIMIZERS)} (with `momentum`, Nesterov when it is above 0)")
    momentum: float = setting(0.9, "`sgd` only; in [0, 1)")
    weight_decay: float = setting(0.0005, "decoupled for `adamw`, L2 for `adam` and `sgd`; "
                                          f"in [0, {MAX_WEIGHT_DECAY:g}]")
    lr_schedule: str = setting("onecycle", f"{_one_of(LR_SCHEDULES)} (constant `lr`)")
    label_smoothing: float = setting(0.05, "training loss only; reported losses are plain cross-entropy")
    mirror: str = setting("auto", "`on`: train on random left-right mirror images too, and predict the mean of an "
                                  "image's and its mirror image's logits; " + _auto("mirror")
                                  + " (a mirrored shirt is a shirt, a mirrored 2 is no digit)")
    augment: str = setting("auto", "how training images are varied, drawn per image and batch: `none`, or some of "
                                   "`shift` (moved by up to 2 pixels), `affine` (rotated, scaled, sheared and moved), "
                                   "`stroke` (strokes thicker or thinner), `elastic` (a smooth random warp), joined by "
                                   "commas; " + _auto("augment"))
    patience: int = setting(0, "stop after this many epochs without a better `val_loss`; 0 = never stop early")
    seed: int = setting(42, f"seeds Python, NumPy, torch and the train/validation split; in [0, {SEEDS - 1}]")
    deterministic: bool = setting(True, "deterministic kernels (on CUDA a little slower)")
    device: str = setting("auto", "`auto` (cuda, else mps, else cpu), `cpu`, `cuda`, `mps`")
    val_fraction: float = setting(0.1, "share of the training set held out for validation")
    max_train_samples: int = setting(0, "cap on the training pool for smoke runs; 0 = all")
    data_dir: str = setting("", "data directory; empty = `$MNISTFLOW_DATA_DIR`, else download")
    log_every: int = setting(50, "steps between step-level `loss` metrics")
    checkpoint_models: bool = setting(False, "`true`: also log each epoch's net as a logged model, "
                                             "`checkpoint-<epoch>` at step `<epoch>`, with that epoch's metrics linked "
                                             "to it, so `register` can take the best one "
                                             "([train.md](train.md#checkpoint-models))")
    system_metrics: bool = setting(True, "MLflow's system metrics on the run (`system/cpu_utilization_percentage`, "
                                         "`system/system_memory_usage_megabytes`, disk, network, and "
                                         "`system/gpu_0_…` on an NVIDIA GPU), sampled every 5 s "
                                         "(`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` sets another interval); "
                                         "`false`: none")
    tensorboard: bool = setting(False, "`true`: also write TensorBoard event files (step `loss`, the epoch metrics, "
                                       "misclassified test images) into the run's artifacts `tensorboard/`; needs "
                                       "`pip install -e \".[tensorboard]\"` ([train.md](train.md#tensorboard))")
    phase: str = setting("development", f"{_one_of(PHASES)}; logged as a tag")
    note: str = setting("", "shown as the run's description (`mlflow.note.content`)")
    register: bool = setting(False, "`true`: after training, run the register step on this run (gate, promote)")
    resume: str = setting("", "id of a FAILED, KILLED or dead RUNNING train run to continue from its newest "
                              "readable checkpoint")

    def validate(self) -> "TrainConfig":
        _check_numbers(self)
        if self.resume:
            return self  # the run's own settings apply; `resumed` checks the flags given against them
        for name, allowed in (("dataset", DATASETS), ("model", ("auto", *MODELS)), ("optimizer", OPTIMIZERS),
                              ("lr_schedule", LR_SCHEDULES), ("phase", PHASES), ("device", DEVICES),
                              ("mirror", SWITCHES)):
            _choose(self, name, allowed)
        kinds = self.augment.split(",")
        if self.augment not in ("auto", "none") and (set(kinds) - set(AUGMENTATIONS) or len(set(kinds)) < len(kinds)):
            raise ConfigError(f"augment {self.augment!r} is not allowed; give auto, none, or some of "
                              f"{', '.join(AUGMENTATIONS)} joined by commas, each once")
        for name, value in AUTO[self.dataset].items():  # resolved here, so the logged config says what was trained
            if getattr(self, name) == "auto":
                setattr(self, name, value)
        for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 0), ("max_train_samples", 0),
                          ("log_every", 1)):
            _at_least(self, name, low)
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"lr={self.lr} is not allowed; it must be in (0, {MAX_LR:g}]")
        _in_range(self, "weight_decay", 0, MAX_WEIGHT_DECAY)
        _in_range(self, "seed", 0, SEEDS - 1)
        if len(self.note) > NOTE_MAX:
            raise ConfigError(f"note {self.note[:40]!r}... ({len(self.note)} characters) is not allowed; "
                              f"MLflow keeps notes of at most {NOTE_MAX} characters")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} is not allowed; it must be in (0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is not allowed; it must be in [0, 1)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} is not allowed; it must be in [0, 1)")
        return self

    def resumed(self, logged: dict) -> "TrainConfig":
        """The config of the run to resume, `logged`, with this one's flags checked against it.

        A resumed run trains exactly as it began: its params are logged once and its one-cycle
        schedule is fixed to its epochs, so a flag that would change it (a larger --epochs too)
        is refused. A flag left at its default counts as not given, since `mlflow run` passes
        every parameter. Only data_dir may differ: the same data, found elsewhere.
        """
        names = {field.name for field in dataclasses.fields(self)}
        if set(logged) - names:
            raise ConfigError(f"the run's config.yaml has settings the train step does not know "
                              f"({', '.join(sorted(set(logged) - names))}); it was not written by the train step")
        for field in dataclasses.fields(self):
            name, given = field.name, getattr(self, field.name)
            if name in ("resume", "data_dir") or given in (field.default, logged.get(name, field.default)):
                continue
            raise ConfigError(f"{name}={given!r} cannot be given with resume: the run was started with "
                              f"{name}={logged.get(name, field.default)!r} and continues as it began; "
                              "start a new run to change it")
        return TrainConfig(**{**logged, "resume": self.resume, "data_dir": self.data_dir or logged.get("data_dir", "")})


@dataclass
class TuneConfig:
    dataset: str = like(TrainConfig, "dataset")
    n_trials: int = setting(10, "trials this invocation adds, shared out over the workers")
    timeout: int = setting(0, "seconds each worker keeps starting trials; 0 = no limit")
    epochs: int = setting(3, "training budget of one trial")
    study_name: str = setting("", f"empty = `<dataset>-cnn`; at most {STUDY_NAME_MAX} characters "
                                  "(what Optuna's storage holds)")
    storage: str = setting("", "an SQLAlchemy URL without a password (`postgresql://` means `postgresql+psycopg2://`, "
                               f"the driver the project installs); empty = `${STORAGE_ENV}`, else "
                               "`sqlite:///optuna.db` in the current directory (the project directory under "
                               "`mlflow run`)")
    sampler: str = setting("tpe", f"{_one_of(SAMPLERS)}, seeded (worker *i* uses `seed + i`)")
    pruner: str = setting("median", "`median`, `hyperband` (stops more trials when they are long) or `none`")
    search_space: str = setting("search_space.yaml", "YAML file: a spec per train setting to sample, or a value to fix")
    workers: int = setting(1, "worker processes on the same study: local ones, or with `launcher=slurm` the tasks "
                              f"of one Slurm array; 1 to {MAX_WORKERS}")
    launcher: str = setting("local", f"{_one_of(LAUNCHERS)} (see [cluster.md](cluster.md)); `slurm` needs a server "
                                     "storage, not SQLite")
    slurm_config: str = setting("", "with `launcher=slurm`: a YAML file of Slurm options (`partition`, `account`, "
                                    "`time`, `cpus_per_task`, `gpus_per_task`, `sbatch_flags`, `max_wait`); "
                                    "empty = the cluster's defaults")
    seed: int = setting(42, "as for `train`; also the sampler's seed (worker *i*'s is `seed + i`, "
                            f"at most {SEEDS - 1})")
    max_train_samples: int = like(TrainConfig, "max_train_samples")
    data_dir: str = like(TrainConfig, "data_dir")
    heartbeat_s: int = setting(30, "a trial whose worker is silent for twice this long is failed and rerun; "
                                   f"1 to {MAX_HEARTBEAT_S} (a day)")
    system_metrics: bool = setting(True, "as for `train`, on each trial's run")

    def validate(self) -> "TuneConfig":
        _check_numbers(self)
        _choose(self, "dataset", DATASETS)
        _choose(self, "sampler", SAMPLERS)
        _choose(self, "pruner", PRUNERS)
        _choose(self, "launcher", LAUNCHERS)
        if self.slurm_config and self.launcher != "slurm":
            raise ConfigError(f"slurm_config={self.slurm_config} is for launcher=slurm, not launcher={self.launcher}")
        for name, low in (("n_trials", 0), ("timeout", 0), ("epochs", 1), ("max_train_samples", 0)):
            _at_least(self, name, low)
        if self.n_trials < 1 and not self.timeout:
            raise ConfigError(f"n_trials={self.n_trials} with no timeout would never stop; "
                              "give n_trials >= 1 or a timeout in seconds")
        _in_range(self, "workers", 1, MAX_WORKERS)
        _in_range(self, "heartbeat_s", 1, MAX_HEARTBEAT_S)
        if not 0 <= self.seed <= SEEDS - self.workers:  # worker i seeds its sampler with seed + i
            raise ConfigError(f"seed={self.seed} is not allowed; with workers={self.workers} it must be in "
                              f"[0, {SEEDS - self.workers}] (worker i seeds its sampler with seed + i)")
        self.study_name = self.study_name or f"{self.dataset}-cnn"
        if len(self.study_name) > STUDY_NAME_MAX:
            raise ConfigError(f"study_name {self.study_name[:40]!r}... ({len(self.study_name)} characters) is not "
                              f"allowed; an Optuna storage holds names of at most {STUDY_NAME_MAX} characters")
        refuse_storage_password(self.storage)
        return self


@dataclass
class RegisterConfig:
    run_id: str = setting("", "the run whose `model` to register; empty = the best FINISHED run of the experiment "
                              "(`MLFLOW_EXPERIMENT_NAME` or `--experiment-name`, else Default) that logged a model")
    dataset: str = setting("", "empty = the run's `dataset` tag; with no `run_id`, choose among `mnist` runs")
    model_name: str = setting("", f"registered model name; empty = {_per_dataset('model_name', '`{}`')}")
    metric: str = setting("test_accuracy", "what \"best\" means when no `run_id` is given; metrics named `*loss` "
                                           "are minimised")
    checkpoint_metric: str = setting("", "empty = the run's model; a metric name (`val_accuracy`) = the run's "
                                         "checkpoint model with the best value of it, `*loss` minimised (needs a run "
                                         "trained with `checkpoint_models=true`; "
                                         "[registry.md](registry.md#a-checkpoint-of-a-run))")
    alias: str = setting("production", "the alias to move; the version it leaves gets `previous` "
                                       "(`<alias>-previous` for other aliases)")
    min_accuracy: float = setting(0.0, f"test accuracy the register gate asks for; 0 = {_per_dataset('min_accuracy')}")
    recall_margin: float = setting(0.0, "how far a class's recall may fall below the mean recall at the register "
                                        f"gate; 0 = {_per_dataset('recall_margin')}")
    # Its default is -1, not 0 as above: 0 is a limit people use here (report the figure, refuse
    # nothing), and some conditions can score 0.
    min_robust_accuracy: float = setting(DATASET_DEFAULT, "accuracy the register gate asks for on the worst condition "
                                                          "of the robustness benchmark "
                                                          "([registry.md](registry.md#the-production-gate)); "
                                                          f"{DATASET_DEFAULT:g} = "
                                                          f"{_per_dataset('min_robust_accuracy')}; "
                                                          "0 = report it, refuse nothing")
    max_latency_ms: float = setting(100.0, "limit the register gate sets on the p95 of single-image inference, in ms")
    max_size_mb: float = setting(10.0, "limit on the size of the model's files, in MB")
    force: bool = setting(False, "promote even when a check fails (recorded as `gate_forced=true`)")
    dry_run: bool = setting(False, "measure and print; register nothing, move no alias")
    rollback: bool = setting(False, "swap the alias and its previous alias (twice = undo)")
    from_alias: str = setting("", "instead of a run's model, the version this alias names (`challenger`, once its "
                                  "canary has run: [serving.md](serving.md#a-canary-for-challenger)): gated and "
                                  "compared as a run's model is, then `alias` moves onto that version and "
                                  "`from_alias` is removed")
    drop_alias: str = setting("", "only remove this alias (`challenger`: its canary ends); nothing is measured")
    data_dir: str = like(TrainConfig, "data_dir")
    allow_pickled_models: bool = setting(False, "also load models mnistflow did not log "
                                                "(they may run code when loaded)")

    def validate(self) -> "RegisterConfig":
        _check_numbers(self)
        if self.dataset:
            _choose(self, "dataset", DATASETS)
        if self.model_name:
            _check_model_name(self.model_name)
        for name in ("metric", "checkpoint_metric") if self.checkpoint_metric else ("metric",):
            if not METRIC.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} is not allowed; a metric name has letters, digits, "
                                  "spaces and _ - . / : only")
        for name in ("min_accuracy", "recall_margin"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed; it must be in [0, 1]")
        if not (0 <= self.min_robust_accuracy <= 1 or self.min_robust_accuracy == DATASET_DEFAULT):
            raise ConfigError(f"min_robust_accuracy={self.min_robust_accuracy} is not allowed; it must be in [0, 1], "
                              f"or {DATASET_DEFAULT:g} for the dataset's default")
        for name in ("max_latency_ms", "max_size_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} is not allowed; it must be > 0")
        if not ALIAS.fullmatch(self.alias) or self.alias == "latest" or re.fullmatch(r"v\d+", self.alias):
            raise ConfigError(f"alias {self.alias!r} is not allowed; use letters, digits, _ and -, "
                              "not 'latest' and not v<number> (MLflow reserves those)")
        for name in ("from_alias", "drop_alias"):
            value = getattr(self, name)
            if value and (not ALIAS.fullmatch(value) or value == self.alias):
                raise ConfigError(f"{name} {value!r} is not allowed; give another alias than alias={self.alias!r}, "
                                  "of letters, digits, _ and -")
        given = [name for name in ("run_id", "from_alias", "drop_alias", "rollback") if getattr(self, name)]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} go separately: give one of run_id, from_alias, drop_alias, "
                              "rollback")
        return self

    def with_dataset(self, dataset: str) -> "RegisterConfig":
        """This config with the dataset's defaults filled in where the user left them unset."""
        defaults = REGISTRY_DEFAULTS[dataset]
        return dataclasses.replace(self, dataset=dataset,
                                   model_name=self.model_name or defaults["model_name"],
                                   min_accuracy=self.min_accuracy or defaults["min_accuracy"],
                                   recall_margin=self.recall_margin or defaults["recall_margin"],
                                   min_robust_accuracy=defaults["min_robust_accuracy"]
                                   if self.min_robust_accuracy == DATASET_DEFAULT else self.min_robust_accuracy)


@dataclass
class PipelineConfig:
    dataset: str = like(TrainConfig, "dataset")
    epochs: int = setting(5, "the train step's epochs")
    n_trials: int = setting(6, "the tune step's trials")
    tune_epochs: int = setting(2, "training budget of each trial")
    max_train_samples: int = setting(0, "cap on the training pool, passed to train and tune; 0 = all")
    model_name: str = like(RegisterConfig, "model_name")
    min_accuracy: float = like(RegisterConfig, "min_accuracy")
    recall_margin: float = like(RegisterConfig, "recall_margin")
    min_robust_accuracy: float = like(RegisterConfig, "min_robust_accuracy")
    max_latency_ms: float = like(RegisterConfig, "max_latency_ms")
    storage: str = like(TuneConfig, "storage")
    data_dir: str = like(TrainConfig, "data_dir")
    force: bool = setting(False, "`true`: rerun every step, even one that already ran with the same parameters")

    def validate(self) -> "PipelineConfig":
        _check_numbers(self)
        _choose(self, "dataset", DATASETS)
        for name, low in (("epochs", 1), ("n_trials", 1), ("tune_epochs", 1), ("max_train_samples", 0)):
            _at_least(self, name, low)
        refuse_storage_password(self.storage)
        # The register step's limits, checked before train and tune spend their time.
        RegisterConfig(model_name=self.model_name, min_accuracy=self.min_accuracy, recall_margin=self.recall_margin,
                       min_robust_accuracy=self.min_robust_accuracy, max_latency_ms=self.max_latency_ms).validate()
        return self


@dataclass
class ProgressiveConfig:
    dataset: str = like(TrainConfig, "dataset")
    epochs: int = setting(5, "epochs of each of the three runs")
    max_train_samples: int = setting(0, "cap on the training pool; 0 = all")
    data_dir: str = like(TrainConfig, "data_dir")
    force: bool = setting(False, "`true`: rerun the three runs even where an identical one ran before")

    def validate(self) -> "ProgressiveConfig":
        _check_numbers(self)
        _choose(self, "dataset", DATASETS)
        _at_least(self, "epochs", 1)
        _at_least(self, "max_train_samples", 0)
        return self


@dataclass
class EvaluateConfig:
    model_uri: str = setting("models:/MNIST_CNN@production", "any model URI: `runs:/<run_id>/model`, "
                                                             "`models:/<name>/<version>`, `models:/<name>@<alias>`")
    dataset: str = setting("", "empty = the one the model was trained on (its metadata)")
    data_dir: str = like(TrainConfig, "data_dir")
    allow_pickled_models: bool = like(RegisterConfig, "allow_pickled_models")

    def validate(self) -> "EvaluateConfig":
        if self.dataset:
            _choose(self, "dataset", DATASETS)
        return self


@dataclass
class PredictConfig:
    images: list[str] = setting([], "image files (PNG, JPEG, ...); with `-P`, one string of paths separated by spaces")
    model_uri: str = setting("models:/MNIST_CNN@production", "any model URI, as for `evaluate`")
    top: int = setting(3, "how many classes to show per image, 1 to 10")
    plot: str = setting("", "a picture to write (PNG, or another format by the name's ending): each image, the 28x28 "
                            "input the model saw, its class probabilities; empty = none")
    payload: str = setting("", "a JSON file to write: the inputs as a body for the model server's `/invocations`; "
                               "empty = none")
    one_digit: bool = setting(False, "read each picture as one digit, where by default a number's digits are "
                                     "read left to right (garments are always read whole)")
    abstain: bool = setting(True, "answer `unsure` where the model's confidence is below the threshold logged "
                                  "with it (chosen on its validation pictures); `false`: always its best guess")
    allow_pickled_models: bool = like(RegisterConfig, "allow_pickled_models")

    def validate(self) -> "PredictConfig":
        _check_numbers(self)
        # `mlflow run -P images="a.png b.png"` passes one argument; split those that name no file.
        self.images = [path for arg in self.images for path in ([arg] if os.path.exists(arg) else arg.split())]
        if not self.images:
            raise ConfigError("images: give at least one image file")
        if not 1 <= self.top <= 10:
            raise ConfigError(f"top={self.top} is not allowed; it must be in 1..10")
        # Before any work: nothing is done for an output that cannot be written.
        _writable(self, "plot", unwritable_image)
        _writable(self, "payload")
        return self


@dataclass
class ServeConfig:
    model_name: str = setting("MNIST_CNN", "the registered model to serve")
    alias: str = setting("production", "the alias to follow: the version it names answers, and when it moves the "
                                       "endpoint moves with it")
    host: str = setting("127.0.0.1", "the IP address the proxy listens on (`0.0.0.0`: all of this machine's); "
                                     "beyond loopback (`127.0.0.1`, `::1`, `localhost`) only with `tls_cert`, "
                                     "`tls_key` and `api_keys_db`")
    port: int = setting(5001, "the proxy's port")
    workers: int = setting(2, f"model processes behind the proxy, 1 to {MAX_SERVE_WORKERS}")
    poll_interval: float = setting(2.0, "seconds between looks at the alias, in (0, 3600]")
    check_accuracy: float = setting(0.8, "a version takes traffic only once each of its processes classifies at "
                                         "least this fraction of the known pictures (the first 100 of its dataset's "
                                         "test split) right; in [0, 1]")
    data_dir: str = like(TrainConfig, "data_dir")
    tls_cert: str = setting("", "the proxy's TLS certificate (PEM, as for `serverFolder/tls_proxy.py`); with "
                                "`tls_key`, the endpoint takes https only")
    tls_key: str = setting("", "the certificate's private key (PEM)")
    api_keys_db: str = setting("", "the tracking server's API key store (`$MNISTFLOW_API_KEYS_DB` of "
                                   "`serverFolder/shared_server.py`): every request but /health and /ping must carry "
                                   "an active key in `X-Api-Key`; empty = no key asked")
    inference_log: str = setting("", "where each prediction of /predict is recorded, a SQLAlchemy URL without a "
                                     "password (`sqlite:///…`, `postgresql+psycopg2://…`; PGPASSWORD or ~/.pgpass); "
                                     "empty = `inference.db` beside a SQLite registry, else in the current "
                                     "directory; `off` = none")
    keep_days: float = setting(30.0, "days the inference log keeps a prediction, in (0, 36500]")
    webhook_address: str = setting("", "`HOST:PORT` where a tracking server on another machine sends its registry "
                                       "webhooks (plain http, each signed): HOST is this machine's name or address "
                                       "as the server reaches it; empty = a loopback port, for a tracking server "
                                       "on this machine only")
    canary_alias: str = setting("challenger", "the alias of a canary: its version, while it has one, takes "
                                              "`canary_share` of the requests beside `alias`'s, until `register` "
                                              "promotes it, the alias is removed, or a canary limit below is breached "
                                              "(the alias is removed here)")
    canary_share: float = setting(0.1, "the canary's share of the requests, in [0, 0.5]; 0 = no canary")
    canary_min_rows: int = setting(300, "the canary is judged once it has this many predictions (latency), and it "
                                        "and `alias`'s version this many with feedback since it began (errors); 1 to "
                                        "1000000")
    canary_max_error_gap: float = setting(0.02, "a canary whose error rate from feedback exceeds that of `alias`'s "
                                                "version by more than this is aborted; in [0, 1]")
    canary_max_latency_ms: float = setting(250.0, "a canary whose p95 latency exceeds this is aborted; in (0, 60000]")

    def validate(self) -> "ServeConfig":
        _check_numbers(self)
        _check_model_name(self.model_name)
        if not ALIAS.fullmatch(self.alias):
            raise ConfigError(f"alias {self.alias!r} is not allowed; give letters, digits, '_' or '-'")
        if not is_host(self.host):
            raise ConfigError(f"host {self.host!r} is not allowed; give a host name or an IP address of this machine "
                              "(127.0.0.1; 0.0.0.0 for all)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both (the certificate and its key) or neither")
        for name in ("tls_cert", "tls_key", "api_keys_db"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} is not a file")
        for name in ("tls_cert", "tls_key"):
            if getattr(self, name) and (refusal := nginx.unwritable(name, getattr(self, name))):
                raise ConfigError(refusal)
        if self.host not in LOOPBACK_HOSTS and not (self.tls_cert and self.api_keys_db):
            raise ConfigError(f"host {self.host!r} is beyond loopback: give tls_cert, tls_key and api_keys_db too, "
                              "so that requests come over TLS with an API key (docs/serving.md)")
        _in_range(self, "port", 1, 65535)
        if self.webhook_address:
            host, _, port = self.webhook_address.rpartition(":")
            if not (is_host(host) and ":" not in host and host != "0.0.0.0" and port.isdigit()
                    and 1 <= int(port) <= 65535):
                raise ConfigError(f"webhook_address {self.webhook_address!r} is not allowed; give HOST:PORT, HOST "
                                  "this machine's name or IPv4 address as the tracking server reaches it, e.g. "
                                  "serve.example.org:5002")
        _in_range(self, "workers", 1, MAX_SERVE_WORKERS)
        if not 0 < self.poll_interval <= 3600:
            raise ConfigError(f"poll_interval={self.poll_interval} is not allowed; it must be in (0, 3600]")
        _in_range(self, "check_accuracy", 0, 1)
        if self.inference_log != "off":
            _check_log_url(self.inference_log, "empty or off")
        if not 0 < self.keep_days <= 36500:
            raise ConfigError(f"keep_days={self.keep_days} is not allowed; it must be in (0, 36500]")
        if not ALIAS.fullmatch(self.canary_alias) or self.canary_alias == self.alias:
            raise ConfigError(f"canary_alias {self.canary_alias!r} is not allowed; give letters, digits, '_' or '-', "
                              f"another alias than alias={self.alias!r}")
        _in_range(self, "canary_share", 0, 0.5)
        _in_range(self, "canary_min_rows", 1, 1_000_000)
        _in_range(self, "canary_max_error_gap", 0, 1)
        if not 0 < self.canary_max_latency_ms <= 60000:
            raise ConfigError(f"canary_max_latency_ms={self.canary_max_latency_ms} is not allowed; it must be in "
                              "(0, 60000]")
        return self


WINDOW = re.compile(r"(\d+(?:\.\d+)?)([smhd])|(\d+)")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_ROWS = 10_000_000


@dataclass
class MonitorConfig:
    model_name: str = setting("MNIST_CNN", "the registered model whose served predictions are judged")
    window: str = setting("24h", "what to judge: a time back from now, a number and `s`, `m`, `h` or `d` (`30m`, "
                                 "`24h`, `7d`, up to 36500d), or a number of predictions (`2000`: the newest 2000)")
    inference_log: str = setting("", "the serve step's inference log (its `inference_log`): a SQLAlchemy URL without "
                                     "a password; empty = `inference.db` beside a SQLite registry, else in the "
                                     "current directory")
    min_rows: int = setting(500, "a version's drift is judged once the window holds this many of its predictions, "
                                 "and its live accuracy once this many carry feedback; 1 to 1000000")
    min_accuracy: float = setting(0.95, "a version whose live accuracy (from feedback) is below this breaches; in "
                                        "[0, 1]")
    retrain: bool = setting(False, "on a breach, run the pipeline (`main`) for the model's dataset and `model_name`, "
                                   "every step anew; `register`'s gate decides whether its model takes over")
    data_dir: str = setting("", "the data `retrain` trains on (as for `main`)")

    def validate(self) -> "MonitorConfig":
        _check_numbers(self)
        _check_model_name(self.model_name)
        if self.span() == (0, 0):
            raise ConfigError(f"window {self.window!r} is not allowed; give a time (30m, 24h, 7d: more than 0, up to "
                              f"36500d) or a number of predictions (1 to {MAX_WINDOW_ROWS})")
        _check_log_url(self.inference_log, "or empty")
        _in_range(self, "min_rows", 1, 1_000_000)
        _in_range(self, "min_accuracy", 0, 1)
        return self

    def span(self) -> tuple[float, int]:
        """The window: (seconds, 0) for a time, (0, rows) for a number of predictions; (0, 0) when it is neither."""
        found = WINDOW.fullmatch(self.window)
        if found and found[3]:
            return (0, int(found[3])) if 1 <= int(found[3]) <= MAX_WINDOW_ROWS else (0, 0)
        seconds = float(found[1]) * SECONDS[found[2]] if found else 0.0
        return (seconds, 0) if 0 < seconds <= 36500 * 86400 else (0, 0)


@dataclass
class PlotLossConfig:
    run_id: str = setting("", "a train run or a tune parent run (required)")
    out: str = setting("", "where to save the picture (PNG, or another format by the name's ending); empty = "
                           "`plot_loss_<run_id>.png` in the current directory")

    def validate(self) -> "PlotLossConfig":
        if not self.run_id:
            raise ConfigError("run_id: give the id of a train run or a tune parent run")
        self.out = self.out or f"plot_loss_{self.run_id}.png"
        _writable(self, "out", unwritable_image)
        return self


def _check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"model_name {name!r} is not allowed; give letters, digits, '_', '.', '-' or spaces, "
                          "starting with a letter or digit")


def _check_log_url(url: str, or_else: str) -> None:
    if url and "://" not in url:
        raise ConfigError(f"inference_log {url!r} is not allowed; give a database URL "
                          f"(sqlite:///inference.db, postgresql+psycopg2://user@host/db), {or_else}")
    if urllib.parse.urlsplit(url).password:
        raise ConfigError("inference_log carries a password, which every user of this machine can read on a "
                          "command line: leave it out (PGPASSWORD, ~/.pgpass)")


def _choose(cfg, name: str, allowed) -> None:
    if getattr(cfg, name) not in allowed:
        raise ConfigError(f"unknown {name} {getattr(cfg, name)!r}; choose from {', '.join(allowed)}")


def _check_numbers(cfg) -> None:
    """Every int and float setting holds a number of its kind, and a finite one. argparse reads
    `nan` and `inf` as floats (NaN fails every comparison, so a range check alone lets it
    through), and a YAML file or a caller may give any type."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.type is int and type(value) is not int:
            raise ConfigError(f"{field.name}={value!r} is not allowed; it must be a whole number")
        if field.type is float and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ConfigError(f"{field.name}={value!r} is not allowed; it must be a finite number")


def _at_least(cfg, name: str, low) -> None:
    if not getattr(cfg, name) >= low:
        raise ConfigError(f"{name}={getattr(cfg, name)} is not allowed; it must be >= {low}")


def _in_range(cfg, name: str, low, high) -> None:
    if not low <= getattr(cfg, name) <= high:
        raise ConfigError(f"{name}={getattr(cfg, name)} is not allowed; it must be in [{low}, {high}]")


def _writable(cfg, name: str, check=unwritable) -> None:
    """ConfigError when the file that setting `name` names cannot be written, as `check` tells."""
    path = getattr(cfg, name)
    reason = check(path)
    if reason:
        raise ConfigError(f"{name}={path}: cannot write this file ({reason})")


def refuse_storage_password(storage: str) -> None:
    """A storage parameter is logged as a run param and printed, so it may not hold a password
    (in the URL's user part or as a `password` query argument)."""
    url = urllib.parse.urlsplit(storage)
    query = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
    secret_keys = {key for key, _ in query if "password" in key.lower()}
    if not (url.password or secret_keys):
        return
    host = url.netloc.rpartition("@")[2]
    netloc = f"{url.username}:***@{host}" if url.password else url.netloc
    masked = url._replace(netloc=netloc, query=urllib.parse.urlencode(
        [(key, "hidden" if key in secret_keys else value) for key, value in query]))
    raise ConfigError(f"storage {urllib.parse.urlunsplit(masked)!r} carries a password, and "
                      "parameters are logged and printed: put the password in PGPASSWORD or ~/.pgpass, "
                      f"or the whole URL in the environment variable {STORAGE_ENV}, which no step logs or prints")


ENTRY_POINTS = {
    "main": PipelineConfig, "train": TrainConfig, "tune": TuneConfig, "register": RegisterConfig,
    "evaluate": EvaluateConfig, "predict": PredictConfig, "serve": ServeConfig, "monitor": MonitorConfig,
    "plot_loss": PlotLossConfig,
    "progressive": ProgressiveConfig,
}


def with_parameter_tables(markdown: str) -> str:
    """`markdown` (docs/parameters.md) with the table of each `## <entry point>` section made from its config."""
    def table(section):
        return section[1] + markdown_table(ENTRY_POINTS[section[2]]) + "\n"
    return re.sub(r"(^## (\w+)\n(?:(?!\|)(?!## ).*\n)*)(?:\|.*\n)*", table, markdown, flags=re.M)


if __name__ == "__main__":  # python -m mnistflow.config docs/parameters.md: rewrite its tables
    [path] = sys.argv[1:]
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(with_parameter_tables(text))
