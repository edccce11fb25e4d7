"""Each entry point's parameters have one source, its dataclass in mnistflow/config.py, where each
one's default and meaning are written: --help shows them, MLproject and docs/parameters.md must say
the same, and so must the production gate's table in docs/registry.md; reading flags must not load
PyTorch."""
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import threading

import mlflow
import pytest
import yaml
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from optuna.storages._rdb.models import MAX_INDEXED_STRING_LENGTH

from conftest import EXPERIMENT, ROOT, run_step
from mnistflow import augment, config, data, flags, models

CONFIGS = config.ENTRY_POINTS


def defaults(cls) -> dict:
    return {field.name: flags.as_parameter(flags.default_of(field)) for field in dataclasses.fields(cls)}


def mlproject() -> dict:
    with open(os.path.join(ROOT, "MLproject")) as f:
        return yaml.safe_load(f)["entry_points"]


def read_doc(name: str) -> str:
    with open(os.path.join(ROOT, "docs", name)) as f:
        return f.read()


def test_every_entry_point_has_a_config():
    assert set(mlproject()) == set(CONFIGS)


@pytest.mark.parametrize("entry_point", CONFIGS)
def test_mlproject_parameters_are_the_configs_fields_with_their_defaults(entry_point):
    spec, expected = mlproject()[entry_point], defaults(CONFIGS[entry_point])
    parameters = spec["parameters"]
    assert list(parameters) == list(expected)
    for name, parameter in parameters.items():
        if "default" in parameter:
            assert flags.as_parameter(parameter["default"]) == expected[name], name
        else:  # required by `mlflow run`: the step refuses it empty too
            assert expected[name] == "", name
            with pytest.raises(config.ConfigError):
                CONFIGS[entry_point]().validate()
        assert f"--{name} {{{name}}}" in spec["command"], name
    assert spec["command"].split()[:3] == ["python", "-m", f"steps.{entry_point}"]


def documented_defaults() -> dict:
    """entry point -> {parameter: default} from docs/parameters.md's tables."""
    sections = re.split(r"^## ", read_doc("parameters.md"), flags=re.M)[1:]
    tables = {}
    for section in sections:
        name = section.split("\n", 1)[0].strip()
        rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", section, flags=re.M)
        tables[name] = {parameter: "" if default == '""' else default for parameter, default in rows}
    return tables


def test_docs_tables_are_the_configs_fields_with_their_defaults():
    documented = documented_defaults()
    assert set(documented) == set(CONFIGS)
    for entry_point, cls in CONFIGS.items():
        assert documented[entry_point] == defaults(cls), entry_point


def test_every_setting_has_a_meaning():
    for entry_point, cls in CONFIGS.items():
        for field in dataclasses.fields(cls):
            assert field.metadata.get("meaning"), f"{entry_point}: {field.name}"


def test_docs_tables_are_written_from_the_configs():
    """Names, defaults and meanings: `python -m mnistflow.config docs/parameters.md` leaves the file as it is."""
    text = read_doc("parameters.md")
    assert config.with_parameter_tables(text) == text, "run: python -m mnistflow.config docs/parameters.md"


def test_the_docs_command_rewrites_stale_tables(tmp_path):
    text = read_doc("parameters.md")
    stale = tmp_path / "parameters.md"
    stale.write_text(text.replace("| passes over the training split |", "| an old meaning |"))
    subprocess.run([sys.executable, "-m", "mnistflow.config", str(stale)], cwd=ROOT, check=True)
    assert stale.read_text() == text


def test_mlproject_writes_no_meaning_of_its_own():
    """Each parameter's meaning lives in its config (and --help, docs/parameters.md), not in MLproject's comments."""
    with open(os.path.join(ROOT, "MLproject")) as f:
        commented = [line.strip() for line in f if re.match(r"\s+\w+: \{type:", line) and "#" in line]
    assert commented == []


@pytest.mark.parametrize("entry_point", CONFIGS)
def test_help_shows_each_parameter_with_its_meaning_and_default(capsys, entry_point):
    step = importlib.import_module(f"steps.{entry_point}")
    with pytest.raises(SystemExit) as exited:
        step.main(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1]
    assert exited.value.code == 0 and "`" not in options and "](" not in options  # plain text, not Markdown
    shown = "".join(options.split())  # argparse wraps the help text anywhere, so compare without white space
    for field in dataclasses.fields(CONFIGS[entry_point]):
        meaning = f"{flags.plain(field.metadata['meaning'])} (default: {flags.shown_default(field)})"
        assert f"--{field.name}" in shown and "".join(meaning.split()) in shown, field.name


def gate_limits_documented() -> dict:
    """limit name -> the numbers in the default column of docs/registry.md's gate table, in order."""
    rows = re.findall(r"^\| [^|]+ \| [<>≤≥] `(\w+)` \| ([^|]+) \|$", read_doc("registry.md"), flags=re.M)
    return {name: [float(number) for number in re.findall(r"\d+(?:\.\d+)?", column.split(";")[0])]
            for name, column in rows}


def test_the_gate_limits_in_registry_md_are_the_configs():
    per_dataset = {name: [config.REGISTRY_DEFAULTS[dataset][name] for dataset in config.DATASETS]
                   for name in ("min_accuracy", "recall_margin", "min_robust_accuracy")}
    fixed = {name: [getattr(config.RegisterConfig, name)] for name in ("max_latency_ms", "max_size_mb")}
    assert gate_limits_documented() == {**per_dataset, **fixed}


def test_the_names_config_checks_are_the_datasets_and_models_there_are():
    assert config.DATASETS == tuple(data.DATASETS)
    assert config.MODELS == tuple(models.MODELS)
    assert config.AUGMENTATIONS == augment.KINDS


def test_reading_flags_loads_no_pytorch():
    # The server scripts and the `mlflow run` plugin read flags through config; they need no torch.
    code = ("import sys, mnistflow.flags, mnistflow.config, mnistflow.cli_guard, mnistflow.keystore\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_flag_takes_its_dashed_spelling_too():
    cfg = flags.parse(config.TrainConfig, "train", "", ["--max-train-samples", "7", "--max_train_samples", "8"])
    assert cfg.max_train_samples == 8
    assert flags.parse(config.PlotLossConfig, "plot_loss", "", ["--run-id", "abc"]).run_id == "abc"


def test_the_limits_config_checks_are_the_ones_of_the_libraries():
    assert config.STUDY_NAME_MAX == MAX_INDEXED_STRING_LENGTH  # its study_name column
    assert config.NOTE_MAX == MAX_PARAM_VAL_LENGTH  # `mlflow run` logs the note as a param
    assert 2 * config.MAX_HEARTBEAT_S < threading.TIMEOUT_MAX  # the grace period is twice the heartbeat


# What each entry point needs besides the flag under test.
REQUIRED = {"predict": ["--images", "digit.png"], "plot_loss": ["--run_id", "abc"]}
TOO_LONG = "s" * 9000


@pytest.mark.parametrize("entry_point, args, message", [
    ("train", ["--lr", "inf"], "lr=inf is not allowed; it must be a finite number"),
    ("train", ["--lr", "nan"], "lr=nan is not allowed; it must be a finite number"),
    ("train", ["--lr", "1e30"], "lr=1e+30 is not allowed; it must be in (0, 10]"),
    ("train", ["--weight_decay", "inf"], "weight_decay=inf is not allowed; it must be a finite number"),
    ("train", ["--weight_decay", "nan"], "weight_decay=nan is not allowed; it must be a finite number"),
    ("train", ["--weight_decay", "5"], "weight_decay=5.0 is not allowed; it must be in [0, 1.0]"),
    ("train", ["--momentum", "nan"], "momentum=nan is not allowed; it must be a finite number"),
    ("train", ["--label_smoothing=-inf"], "label_smoothing=-inf is not allowed; it must be a finite number"),
    ("train", ["--val_fraction", "nan"], "val_fraction=nan is not allowed; it must be a finite number"),
    ("train", ["--seed", "-1"], "seed=-1 is not allowed; it must be in [0, 4294967295]"),
    ("train", ["--seed", "12345678901234567890"], "seed=12345678901234567890 is not allowed; it must be in [0, "),
    ("train", ["--batch_size", "1e3"], "argument --batch_size/--batch-size: invalid int value: '1e3'"),
    ("tune", ["--seed", "-1"], "seed=-1 is not allowed; with workers=1 it must be in [0, 4294967295]"),
    ("tune", ["--seed", "4294967295", "--workers", "2"],
     "seed=4294967295 is not allowed; with workers=2 it must be in [0, 4294967294] (worker i seeds its sampler "
     "with seed + i)"),
    ("tune", ["--heartbeat_s", "100000000000"], "heartbeat_s=100000000000 is not allowed; it must be in [1, 86400]"),
    ("tune", ["--heartbeat_s", "1e11"], "argument --heartbeat_s/--heartbeat-s: invalid int value: '1e11'"),
    ("tune", ["--workers", "100000000"], "workers=100000000 is not allowed; it must be in [1, 1000]"),
    ("train", ["--note", TOO_LONG], "note 'ssssssssssssssssssssssssssssssssssssssss'... (9000 characters) is not "
                                    "allowed; MLflow keeps notes of at most 6000 characters"),
    ("tune", ["--study_name", TOO_LONG], "study_name 'ssssssssssssssssssssssssssssssssssssssss'... (9000 characters) "
                                         "is not allowed; an Optuna storage holds names of at most 512 characters"),
    ("main", ["--min_accuracy", "nan"], "min_accuracy=nan is not allowed; it must be a finite number"),
    ("main", ["--recall_margin", "inf"], "recall_margin=inf is not allowed; it must be a finite number"),
    ("main", ["--min_robust_accuracy", "nan"], "min_robust_accuracy=nan is not allowed; it must be a finite number"),
    ("main", ["--max_latency_ms", "0"], "max_latency_ms=0.0 is not allowed; it must be > 0"),
    ("main", ["--epochs", "-3"], "epochs=-3 is not allowed; it must be >= 1"),
    ("register", ["--max_latency_ms", "inf"], "max_latency_ms=inf is not allowed; it must be a finite number"),
    ("register", ["--max_size_mb", "nan"], "max_size_mb=nan is not allowed; it must be a finite number"),
    ("register", ["--min_accuracy=-inf"], "min_accuracy=-inf is not allowed; it must be a finite number"),
    ("progressive", ["--max_train_samples", "-1"], "max_train_samples=-1 is not allowed; it must be >= 0"),
    ("predict", ["--top", "0"], "top=0 is not allowed; it must be in 1..10"),
])
def test_a_number_that_is_not_one_or_out_of_range_is_one_line(capsys, entry_point, args, message):
    """Every flag that takes a number, in this process: the steps read their flags through
    flags.parse before any work (their command lines are run below)."""
    with pytest.raises(SystemExit) as exited:
        flags.parse(CONFIGS[entry_point], entry_point, "", [*REQUIRED.get(entry_point, []), *args])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and line.startswith(f"{entry_point}: error: {message}"), line


# Each entry point once through `mlflow run`, which passes every parameter as text.
@pytest.mark.parametrize("entry_point, parameters, message", [
    ("train", ["lr=inf"], "train: error: lr=inf is not allowed; it must be a finite number"),
    ("tune", ["seed=-1"], "tune: error: seed=-1 is not allowed"),
    ("main", ["min_accuracy=nan"], "main: error: min_accuracy=nan is not allowed; it must be a finite number"),
    ("progressive", ["epochs=1.5"], "progressive: error: argument --epochs: invalid int value: '1.5'"),
    ("register", ["max_size_mb=inf"], "register: error: max_size_mb=inf is not allowed; it must be a finite number"),
    ("predict", ["images=digit.png", "plot=preds.txt"], "predict: error: plot=preds.txt: cannot write this file "
                                                        "(its name must end in a format matplotlib writes: "),
    ("plot_loss", ["run_id=abc", "out=loss.txt"], "plot_loss: error: out=loss.txt: cannot write this file "
                                                  "(its name must end in a format matplotlib writes: "),
])
def test_a_bad_number_or_output_through_mlflow_run_is_one_line_and_no_running_run(store, entry_point, parameters,
                                                                                 message):
    result = run_step("mlflow", "run", ".", "-e", entry_point, "--env-manager", "local",
                      *[arg for parameter in parameters for arg in ("-P", parameter)])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith(f"{entry_point}: ")]
    assert line.startswith(message), line
    # Only the run `mlflow run` opened, ended FAILED; nothing else, no file.
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not {"preds.txt", "loss.txt"} & set(os.listdir(ROOT))
