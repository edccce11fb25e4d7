"""Tune workers as a Slurm array job, and a step as a Slurm job, on a real one-node Slurm
(serverFolder/local_slurm.py: munged, slurmctld and slurmd from Debian's packages) against the
test PostgreSQL: a study, a worker killed mid-trial, `scancel` of the array, and bad input."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import mlflow
import optuna
import pytest

from conftest import (EXPERIMENT, ROOT, project_copy, python_step, refused_script, require, run_step,
                      sigint_as_in_a_terminal, step_env, wait_until)
import local_slurm
from mnistflow import slurm, tuning
from mnistflow.errors import StepFailed

SMALL = ["--epochs", "1", "--pruner", "none", "--system_metrics", "false"]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Slurm for this module, started and stopped as docs/cluster.md says; sbatch,
    squeue and scancel find it through SLURM_CONF."""
    require(local_slurm.available(), "Slurm", "slurm-wlm munge")
    root = tempfile.mkdtemp(prefix="mnistflow-slurm-")
    try:
        started = run_step("python", "serverFolder/local_slurm.py", "--root", root)
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"export SLURM_CONF={root}/slurm.conf\n"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SLURM_CONF", f"{root}/slurm.conf")
            yield root
    finally:
        run_step("python", "serverFolder/local_slurm.py", "--root", root, "--stop")
        shutil.rmtree(root, ignore_errors=True)


def test_the_documented_slurm_options_make_the_batch_script(tmp_path):
    with open(os.path.join(ROOT, "docs", "cluster.md")) as f:
        [example] = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
    (tmp_path / "slurm.yaml").write_text(example)
    options = slurm.load_options(str(tmp_path / "slurm.yaml"))
    script = slurm.batch_script(options, 8, "/jobs/tune 1")
    assert [line for line in script.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=mnistflow-tune", "#SBATCH --array=0-7", '#SBATCH --output="/jobs/tune 1/task-%a.out"',
        "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --time=2:00:00",
        "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-task=1"]
    assert slurm.sbatch_flags(options) == ["--mem=16G", "--qos=normal"]  # sbatch's arguments, not the script's
    assert "exec " + shlex.quote(sys.executable) + " -m mnistflow.slurm '/jobs/tune 1'" in script
    assert slurm.seconds(options["max_wait"]) == 2 * 24 * 3600


@pytest.mark.parametrize("text, options", [
    ("time: 2:00:00\n", {"time": "2:00:00"}),  # YAML 1.1 reads an unquoted 2:00:00 as the number 7200
    ("time: 90:00\nmax_wait: 1-12:00\n", {"time": "90:00", "max_wait": "1-12:00"}),
    ("time: 30\n", {"time": "30"}),  # minutes, as Slurm takes a bare number
    ("partition: gpu,debug\nsbatch_flags: --comment='two words' -N1\n",
     {"partition": "gpu,debug", "sbatch_flags": "--comment='two words' -N1"}),
])
def test_slurm_options_are_read_as_slurm_means_them(tmp_path, text, options):
    (tmp_path / "slurm.yaml").write_text(text)
    assert slurm.load_options(str(tmp_path / "slurm.yaml")) == options


def study_name() -> str:
    return f"slurm-{time.time_ns()}"


def tune(storage: str, data_dir: str, name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "steps.tune", "--launcher", "slurm", "--storage", storage, "--data_dir", data_dir,
            "--study_name", name, *args]


def runs(**filters) -> list:
    return mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list", **filters)


def no_run_or_trial_left_running(storage: str, name: str) -> None:
    assert [run.info.run_name for run in runs() if run.info.status == "RUNNING"] == []
    assert [t.number for t in optuna.load_study(study_name=name, storage=storage).trials
            if t.state.name == "RUNNING"] == []


def jobs() -> str:
    squeue = [local_slurm.binary("squeue"), "--noheader"]
    return subprocess.run(squeue, capture_output=True, text=True, check=True).stdout


def test_mlflow_run_tunes_with_a_slurm_array_of_two_workers_from_a_project_path_with_a_space(cluster, store, tiny_data,
                                                                                           postgres_url, tmp_path):
    project = project_copy(tmp_path / "my project")
    # with an unquoted time (a number to YAML 1.1) and a flag whose value holds a space
    (tmp_path / "my project" / "slurm.yaml").write_text('time: 2:00:00\nsbatch_flags: --comment="from my project"\n')
    name = study_name()
    result = subprocess.run(["mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "launcher=slurm",
                             "-P", "slurm_config=slurm.yaml", "-P", "workers=2", "-P", "n_trials=3", "-P", "epochs=1",
                             "-P", "pruner=none", "-P", "system_metrics=false", "-P", f"storage={postgres_url}",
                             "-P", f"data_dir={tiny_data}", "-P", f"study_name={name}"],
                            cwd=project, env=step_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    [job] = {t.user_attrs[tuning.SLURM_JOB_ATTR] for t in study.trials}
    assert f"Slurm task {job}_0: COMPLETED" in result.stdout and f"Slurm task {job}_1: COMPLETED" in result.stdout
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    assert "Comment=from my project" in shown and "TimeLimit=02:00:00" in shown

    # one parent run (the one `mlflow run` opened), each trial a nested run tagged with its array task
    parent_id = study.user_attrs[tuning.PARENT_RUN_ATTR]
    [parent] = [run for run in runs() if run.info.run_id == parent_id]
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"study-{name}"
    trials = runs(filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(runs()) == 1 + len(trials) == 4
    assert sorted(run.data.tags["trial_number"] for run in trials) == ["0", "1", "2"]
    assert {run.data.tags["slurm_array_job_id"] for run in trials} == {job}
    assert sorted(run.data.tags["slurm_array_task_id"] for run in trials) in (["0", "0", "1"], ["0", "1", "1"])
    assert all(run.data.tags["slurm_job_id"] for run in trials)
    no_run_or_trial_left_running(postgres_url, name)

    # the parent holds what a local study's holds, and the batch script and each task's output
    client = mlflow.MlflowClient()
    artifacts = {f.path for folder in (None, "plots", "slurm") for f in client.list_artifacts(parent_id, folder)}
    assert {"trials.csv", "best_params.json", "plots/optimization_history.png", "slurm/tune.sbatch",
            "slurm/task-0.out", "slurm/task-1.out"} <= artifacts
    assert "test_accuracy" in parent.data.metrics  # the best trial's model, tested
    assert parent.data.tags["best_trial_run_id"] == study.best_trial.user_attrs[tuning.RUN_ID_ATTR]
    script = mlflow.artifacts.load_text(f"runs:/{parent_id}/slurm/tune.sbatch")
    assert "#SBATCH --array=0-1" in script
    assert os.environ["PGPASSWORD"] not in script  # the tasks got it from the environment
    assert job_folders(project) == []  # the job folder went to the parent run
    assert jobs() == ""


def job_folders(project=ROOT) -> list[str]:
    """The job folders the tune step left in the project directory (it removes its own when done)."""
    folder = os.path.join(project, slurm.JOBS_FOLDER)
    return os.listdir(folder) if os.path.isdir(folder) else []


def training_trials(storage: str, name: str) -> list:
    """The trials that have started training (their run exists), once the study does."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    return [t for t in study.trials if tuning.RUN_ID_ATTR in t.user_attrs]


def test_a_slurm_worker_killed_mid_trial_fails_it_and_the_trial_is_rerun(cluster, store, tiny_data, postgres_url):
    name = study_name()
    # Trials long enough to kill one in, short enough for the other to complete soon.
    step = subprocess.Popen(tune(postgres_url, tiny_data, name, "--workers", "2", "--n_trials", "2",
                                 "--pruner", "none", "--system_metrics", "false", "--epochs", "30"),
                            cwd=ROOT, env=step_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    [victim, *_] = wait_until(lambda: training_trials(postgres_url, name), "a trial's training", 180, alive=step, every=0.5)
    pid = int(victim.user_attrs[tuning.WORKER_ATTR].rsplit(":", 1)[1])  # a task's process on this one node
    os.kill(pid, 9)
    stdout, stderr = step.communicate(timeout=300)
    assert step.returncode == 1, stderr[-3000:]
    [line] = stderr.strip().splitlines()
    job = victim.user_attrs[tuning.SLURM_JOB_ATTR]
    assert line.startswith("tune: error: Slurm task ") and "ended FAILED; its trial was marked failed" in line
    study = optuna.load_study(study_name=name, storage=postgres_url)
    dead = study.trials[victim.number]
    assert dead.state.name == "FAIL"
    assert mlflow.get_run(dead.user_attrs[tuning.RUN_ID_ATTR]).info.status == "FAILED"
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL", "WAITING"]
    assert mlflow.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR]).info.status == "FAILED"
    no_run_or_trial_left_running(postgres_url, name)

    # the next tune of the study, again through Slurm, reruns it with the same params
    again = python_step(*tune(postgres_url, tiny_data, name, "--n_trials", "1", *SMALL)[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    retry = optuna.load_study(study_name=name, storage=postgres_url).trials[-1]
    assert retry.state.name == "COMPLETE" and retry.params == dead.params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == victim.number
    assert retry.user_attrs[tuning.SLURM_JOB_ATTR] != job
    no_run_or_trial_left_running(postgres_url, name)


@pytest.mark.parametrize("stop", ["scancel", "ctrl-c"])
def test_a_stopped_array_ends_the_step_with_nothing_left_running(cluster, store, tiny_data, postgres_url, stop):
    name = study_name()
    step = subprocess.Popen(tune(postgres_url, tiny_data, name, "--workers", "2", "--n_trials", "2",
                                 "--epochs", "500", "--pruner", "none", "--system_metrics", "false"),
                            cwd=ROOT, env=step_env(), preexec_fn=sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = wait_until(lambda: len(training_trials(postgres_url, name)) == 2 and training_trials(postgres_url, name),
                        "both trials' training", 180, alive=step, every=0.5)
    job = trials[0].user_attrs[tuning.SLURM_JOB_ATTR]
    if stop == "scancel":
        subprocess.run(["scancel", job], check=True)  # as a user would, from another shell
    else:
        step.send_signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the step, not the tasks on their nodes
    stdout, stderr = step.communicate(timeout=120)
    study = optuna.load_study(study_name=name, storage=postgres_url)
    parent = mlflow.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR])
    if stop == "scancel":
        assert step.returncode == 1
        [line] = stderr.strip().splitlines()
        assert line.startswith(f"tune: error: Slurm task {job}_") and "ended CANCELLED" in line
        assert parent.info.status == "FAILED"
    else:
        assert step.returncode != 0 and f"cancelling Slurm job {job}" in stdout
        assert parent.info.status == "KILLED"
    assert {mlflow.get_run(t.user_attrs[tuning.RUN_ID_ATTR]).info.status for t in study.trials
            if tuning.RUN_ID_ATTR in t.user_attrs} <= {"FAILED", "KILLED"}
    # Both trials failed and are queued again, as after Slurm's time limit, which stops a task the same way.
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL", "WAITING", "WAITING"]
    no_run_or_trial_left_running(postgres_url, name)
    assert jobs() == ""


# Each value reaches sbatch; one that would end its #SBATCH line (and run what follows in the job), or be
# taken for the script to submit, is refused before anything is written.
BAD_OPTIONS = [
    ('partition: "debug\\ntouch {marker}"', "partition must be one or more partition names (letters, digits, "
                                            "'_', '.', '-'), comma-separated, not 'debug\\ntouch {marker}'"),
    ("partition: debug gpu", "partition must be one or more partition names"),
    ("account: my project", "account must be an account name (letters, digits, '_', '.', '-'), not 'my project'"),
    ('account: "a\\tb"', "account must be an account name"),
    ("time: 2 hours", "time must be minutes or a duration such as \"2:00:00\" or \"1-12:00:00\", or UNLIMITED, "
                      "not '2 hours'"),
    ('time: "2:00:00\\ntouch {marker}"', "time must be minutes or a duration"),
    ("cpus_per_task: 0", "cpus_per_task must be a whole number, at least 1, not 0"),
    ("gpus_per_task: 1; touch {marker}", "gpus_per_task must be a whole number, at least 1 (leave it out for none), "
                                         "not '1; touch "),
    ('sbatch_flags: "--mem=1G\\ntouch {marker}"', "sbatch_flags must be sbatch options on one line, each written as "
                                                 "--name=value or -Xvalue, none of --array, -a, --output, -o, "
                                                 "--parsable, --export, --test-only (the step sets those), "
                                                 "not '--mem=1G\\ntouch "),
    ("sbatch_flags: --mem=1G {marker}.sh", "sbatch_flags must be sbatch options on one line"),  # sbatch's script
    ("sbatch_flags: --mem 16G", "(the step sets those), not '--mem 16G'"),
    ("sbatch_flags: --comment='unclosed", "sbatch_flags must be sbatch options on one line"),
    ("sbatch_flags: --arr=0-99", "none of --array, -a, --output, -o, --parsable, --export, --test-only (the step "
                                 "sets those), not '--arr=0-99'"),
    ("sbatch_flags: -o/tmp/elsewhere", "(the step sets those), not '-o/tmp/elsewhere'"),
    ("max_wait: forever", "max_wait must be a duration such as \"12:00:00\" or \"2-00:00:00\", not 'forever'"),
]


@pytest.mark.parametrize("case, message", [
    ("no sbatch", "launcher=slurm needs Slurm's sbatch, which is not on PATH"),
    ("sqlite", "is SQLite, which workers on other nodes cannot share"),
    ("bad partition", "sbatch refuses the job: invalid partition specified: nope"),
    ("unknown option", "unknown option 'queue'; allowed: partition, account, time"),
    ("current directory", "holds a backslash or a control character, which Slurm's --output cannot take"),
    *BAD_OPTIONS,
])
def test_bad_slurm_input_is_one_line_before_anything_is_submitted(cluster, store, tiny_data, postgres_url, tmp_path,
                                                                   monkeypatch, capsys, case, message):
    name, storage, args, here = study_name(), postgres_url, [], ROOT
    marker = tmp_path / "ran"  # what a command smuggled into a value would create
    if case == "no sbatch":
        monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    elif case == "sqlite":
        storage = f"sqlite:///{tmp_path}/optuna.db"
    elif case == "current directory":
        here = tmp_path / "back\\slash"
        here.mkdir()
        args = ["--search_space", os.path.join(ROOT, "search_space.yaml")]
    else:
        yaml_line = {"bad partition": "partition: nope", "unknown option": "queue: gpu"}.get(case, case)
        (tmp_path / "slurm.yaml").write_text(yaml_line.format(marker=marker) + "\n")
        args = ["--slurm_config", str(tmp_path / "slurm.yaml")]
    monkeypatch.chdir(here)  # in this process: faster than a new interpreter per case
    line = refused_script(monkeypatch, capsys, os.path.join(ROOT, "steps", "tune.py"),
                          *tune(storage, tiny_data, name, *args, "--n_trials", "1", *SMALL)[3:])
    assert line.startswith("tune: error: ")
    assert message.format(marker=marker) in line
    assert runs() == [] and name not in optuna.get_all_study_names(postgres_url)
    assert not os.path.exists(tmp_path / "optuna.db") and not os.path.exists(marker)
    assert jobs() == "" and job_folders(here) == []


# One case through the CLI; the table above has them all.
def test_a_refused_job_through_mlflow_run_leaves_its_run_failed(cluster, store, tiny_data, postgres_url, tmp_path):
    message = "sbatch refuses the job: invalid partition specified: nope"
    (tmp_path / "slurm.yaml").write_text("partition: nope\n")
    result = run_step("mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "launcher=slurm",
                      "-P", f"slurm_config={tmp_path / 'slurm.yaml'}", "-P", f"storage={postgres_url}",
                      "-P", f"data_dir={tiny_data}", "-P", "n_trials=1", "-P", "epochs=1")
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if line.startswith("tune: error: ")]
    assert message in line
    assert [run.info.status for run in runs()] == ["FAILED"]
    assert jobs() == "" and job_folders() == []


def submitted(*sbatch_args: str) -> str:
    """A job submitted straight to the cluster (its output discarded); its id."""
    done = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", *sbatch_args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize("case, message", [
    ("requeued held", "is PENDING (held), which it leaves only when someone acts on it; cancelled job"),
    ("special exit", "is SPECIAL_EXIT, which it leaves only when someone acts on it; cancelled job"),
    ("overdue", "did not end within 0:00:00 (max_wait in slurm_config sets how long the step waits); cancelled job"),
])
def test_waiting_on_a_stuck_or_overdue_array_cancels_it_with_one_line(cluster, case, message):
    if case == "overdue":
        job = submitted("--array=0-1", "--wrap=sleep 600")
    else:  # scontrol puts a job that ran back in the queue, held, as a node's health check or an admin may
        job = submitted("--array=0", "--wrap=true")
        wait_until(lambda: slurm.task_states(job) == {"0": "COMPLETED"}, "the job's end")
        subprocess.run(["scontrol", "requeuehold", *(["State=SpecialExit"] if case == "special exit" else []), job],
                       check=True)
    with pytest.raises(StepFailed) as failed:
        slurm.wait(job, 0 if case == "overdue" else 3600)
    assert message in str(failed.value) and len(str(failed.value).splitlines()) == 1
    assert slurm.ended(slurm.task_states(job)) and jobs() == ""


def test_a_tune_whose_array_is_held_ends_with_one_line_and_nothing_left_running(cluster, store, tiny_data,
                                                                               postgres_url, tmp_path):
    (tmp_path / "slurm.yaml").write_text("sbatch_flags: --hold\n")  # held until released: never, here
    name = study_name()
    result = python_step(*tune(postgres_url, tiny_data, name, "--slurm_config", str(tmp_path / "slurm.yaml"),
                               *SMALL)[2:], timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("tune: error: Slurm task ") and "is PENDING (held)" in line and "; cancelled job" in line
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert mlflow.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR]).info.status == "FAILED"
    no_run_or_trial_left_running(postgres_url, name)
    assert jobs() == "" and job_folders() == []


def test_a_step_as_a_slurm_job_logs_to_the_same_store_tagged_with_the_job(cluster, store, tiny_data, tmp_path):
    # The template's command, as docs/cluster.md gives it (--parsable: the job id; --output: not in the
    # project). Its end is polled here: `sbatch --wait` polls at 2, 8 and 32 s.
    submitted = run_step("sbatch", "--parsable", f"--output={tmp_path}/%j.out", "slurm/step.sbatch", "train",
                         "-P", "epochs=1", "-P", f"data_dir={tiny_data}", "-P", "system_metrics=false")
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    states = wait_until(lambda: slurm.ended(states := slurm.task_states(job)) and states, "the job's end", timeout=300)
    assert list(states.values()) == ["COMPLETED"], (tmp_path / f"{job}.out").read_text()[-3000:]
    [run] = runs()
    assert run.info.status == "FINISHED" and run.data.tags["slurm_job_id"] == job
    assert "slurm_array_task_id" not in run.data.tags
