"""Each entry point's parameters have one source, its dataclass in mnistflow/config.py: MLproject
and docs/parameters.md must say the same, and reading flags must not load PyTorch."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from mnistflow import augment, config, data, models

CONFIGS = {
    "main": config.PipelineConfig, "train": config.TrainConfig, "tune": config.TuneConfig,
    "register": config.RegisterConfig, "evaluate": config.EvaluateConfig, "predict": config.PredictConfig,
    "plot_loss": config.PlotLossConfig, "progressive": config.ProgressiveConfig,
}


def as_parameter(value) -> str:
    """A default as `-P` takes it: booleans true/false, an empty list as ""."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value == [] else str(value)


def defaults(cls) -> dict:
    return {setting.name: as_parameter(setting.default_factory() if setting.default is dataclasses.MISSING
                                       else setting.default) for setting in dataclasses.fields(cls)}


def mlproject() -> dict:
    with open(os.path.join(ROOT, "MLproject")) as f:
        return yaml.safe_load(f)["entry_points"]


def test_every_entry_point_has_a_config():
    assert set(mlproject()) == set(CONFIGS)


@pytest.mark.parametrize("entry_point", CONFIGS)
def test_mlproject_parameters_are_the_configs_fields_with_their_defaults(entry_point):
    spec, expected = mlproject()[entry_point], defaults(CONFIGS[entry_point])
    parameters = spec["parameters"]
    assert list(parameters) == list(expected)
    for name, parameter in parameters.items():
        if "default" in parameter:
            assert as_parameter(parameter["default"]) == expected[name], name
        else:  # required by `mlflow run`: the step refuses it empty too
            assert expected[name] == "", name
            with pytest.raises(config.ConfigError):
                CONFIGS[entry_point]().validate()
        assert f"--{name} {{{name}}}" in spec["command"], name
    assert spec["command"].split()[:3] == ["python", "-m", f"steps.{entry_point}"]


def documented_defaults() -> dict:
    """entry point -> {parameter: default} from docs/parameters.md's tables."""
    with open(os.path.join(ROOT, "docs", "parameters.md")) as f:
        sections = re.split(r"^## ", f.read(), flags=re.M)[1:]
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


def test_the_names_config_checks_are_the_datasets_and_models_there_are():
    assert config.DATASETS == tuple(data.DATASETS)
    assert config.MODELS == tuple(models.MODELS)
    assert config.AUGMENTATIONS == augment.KINDS


def test_reading_flags_loads_no_pytorch():
    # The server scripts and the `mlflow run` plugin read flags through config; they need no torch.
    code = ("import sys, mnistflow.config, mnistflow.cli_guard, mnistflow.keystore\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_flag_takes_its_dashed_spelling_too():
    cfg = config.parse(config.TrainConfig, "train", "", ["--max-train-samples", "7", "--max_train_samples", "8"])
    assert cfg.max_train_samples == 8
    assert config.parse(config.PlotLossConfig, "plot_loss", "", ["--run-id", "abc"]).run_id == "abc"
