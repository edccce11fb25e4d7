"""bench/bad_inputs.py, the sweep of bad input over every entry point: what it covers, how it tells
outcomes apart, and two real probes through its command line."""
import importlib.util
import os
import re
import sys

import pytest
import yaml

from conftest import ROOT, run_step

sys.path.insert(0, os.path.join(ROOT, "bench"))  # as `python bench/bad_inputs.py` has it
SPEC = importlib.util.spec_from_file_location("bad_inputs", os.path.join(ROOT, "bench", "bad_inputs.py"))
sweep = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(sweep)


def test_the_probes_cover_every_entry_point_both_ways():
    probes = sweep.PROBES
    assert len(probes) >= 80 and len({probe.id for probe in probes}) == len(probes)
    with open(os.path.join(ROOT, "MLproject")) as f:
        steps = {f"steps.{name}" for name in yaml.safe_load(f)["entry_points"]}
    for how in ("python -m", "mlflow run"):
        assert {probe.entry for probe in probes if probe.how == how} == steps, how
    scripts = {f"{folder}/{name}" for folder in ("researcher", "serverFolder", "bench")
               for name in os.listdir(os.path.join(ROOT, folder)) if name.endswith(".py")}
    assert {probe.entry for probe in probes if probe.how == "python"} == scripts - {
        "researcher/helpers.py", "bench/bad_inputs.py", "bench/no_telemetry.py", "bench/locustfile.py",
        "bench/load.py", "bench/picture_flags.py"}


MLFLOW_RAN = "2026/12/05 08:44:23 INFO mlflow.projects.backend.local: === Running command 'python -m steps.train' ===\n"
MLFLOW_FAILED = "2026/12/05 08:44:29 ERROR mlflow.cli: === Run (ID '4386eb4e') failed ===\n"
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: Seed must be >= 0\n'


@pytest.mark.parametrize("how, exit_code, stderr, names, outcome", [
    ("python -m", 2, "train: error: lr=nan is not allowed; it must be > 0\n", "", "one-line"),
    ("python -m", 1, "train: refused: test_accuracy 0.5 < 0.99\n", "", "one-line"),
    ("python -m", 2, "usage: train [-h]\ntrain: error: unrecognized arguments: --x\n", "", "other"),
    ("python -m", 3, "train: error: lr=nan is not allowed\n", "", "other"),
    ("python -m", 2, "ValueError: not the program's own line\n", "", "other"),
    ("python -m", 1, "tune: error: sbatch refuses the job: no slurm.conf\n", "partition", "other"),
    ("python -m", 1, TRACEBACK, "", "traceback"),
    ("python -m", 0, "", "", "accepted"),
    ("python -m", None, "epoch 1/5\n", "", "hang"),
    ("mlflow run", 1, MLFLOW_RAN + "train: error: lr=nan is not allowed\n" + MLFLOW_FAILED, "", "one-line"),
    ("mlflow run", 2, "mlflow run: error: storage carries a password\n", "", "one-line"),
    ("mlflow run", 1, MLFLOW_RAN + TRACEBACK + MLFLOW_FAILED, "", "traceback"),
    ("python", 2, "users create: error: the following arguments are required: username\n", "", "one-line"),
])
def test_an_outcome_is_told_by_what_the_user_sees(how, exit_code, stderr, names, outcome):
    probe = sweep.Probe("serverFolder/users.py" if how == "python" else "steps.train", how, "bad", names=names)
    assert sweep.classify(probe, exit_code, stderr)[0] == outcome


def test_a_one_line_refusal_that_left_something_behind_fails_the_sweep():
    probe = sweep.Probe("steps.train", "python -m", "--lr nan")
    clean = sweep.Result(probe, "one-line", "train: error: ...", 2, {}, 0, [], 1.0)
    assert clean.ok and sweep.exit_code([clean]) == 0
    dirty = sweep.Result(probe, "one-line", "train: error: ...", 2, {"RUNNING": 1}, 0, ["run RUNNING"], 1.0)
    assert not dirty.ok and sweep.exit_code([clean, dirty]) == 1


def test_only_runs_the_probes_chosen_and_prints_their_table():
    result = run_step(sys.executable, "bench/bad_inputs.py", "--only",
                      "steps.train:--epochs_0,serverFolder/local_server.py:--port_0", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"(OK|FAIL) +\d+ ", line)]
    assert [(row[2], row[3], row[7]) for row in rows] == [("one-line", "2", "steps.train"),
                                                          ("one-line", "2", "serverFolder/local_server.py")]
    assert "2 probes: one-line 2, traceback 0, accepted 0, other 0, hang 0" in result.stdout
