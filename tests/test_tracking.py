"""The run life cycle against a real SQLite store: how a run ends, what a failed write or a Ctrl-C
does, the tags that record it, and the liveness that resuming a run relies on."""
import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from conftest import ctrl_c_at_the_next_write_commit
from mnistflow import tracking
from mnistflow.errors import ConfigError


def test_run_ends_finished_failed_or_killed(store):
    with tracking.tracked_run() as (run, log_metrics):
        log_metrics({"x": 1.0}, 1)
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.get_run(run.info.run_id).data.metrics == {"x": 1.0}

    with pytest.raises(RuntimeError):
        with tracking.tracked_run() as (run, log_metrics):
            log_metrics({"x": 2.0}, 1)
            raise RuntimeError("crash mid-training")
    crashed = mlflow.get_run(run.info.run_id)
    assert crashed.info.status == "FAILED"
    assert crashed.data.metrics == {"x": 2.0}  # what was measured before the crash is kept

    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            raise KeyboardInterrupt
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"


def test_a_run_that_cannot_be_ended_says_so_and_keeps_the_interrupt(store, capsys):
    # Any other write interrupted mid-commit still locks the database for this process (for
    # MLflow's 20 s busy timeout): the user gets Ctrl-C's exit and one line, not a store traceback.
    with ctrl_c_at_the_next_write_commit() as arm, pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run() as (run, _):
            arm()
            mlflow.set_tag("note", "written while Ctrl-C is pressed")
    assert f"warning: run {run.info.run_id} could not be ended KILLED and stays RUNNING: " in capsys.readouterr().out
    assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_metric_that_cannot_be_written_fails_the_run(store):
    with pytest.raises(mlflow.exceptions.MlflowException):
        with tracking.tracked_run() as (run, log_metrics):
            log_metrics({"ok": 1.0}, 1)
            log_metrics({"bad key?!": 1.0}, 1)  # MLflow rejects this name when it writes
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"


def test_logged_config_reads_the_settings_of_runs_from_before_mirror_and_augment(store):
    def logged(config: dict) -> dict:
        with mlflow.start_run() as run:
            mlflow.log_dict(config, "config.yaml")
        return tracking.logged_config(run.info.run_id)

    assert logged({"model": "fast", "dataset": "fashion_mnist"}) == {
        "model": "fast", "dataset": "fashion_mnist", "mirror": "off", "augment": "none"}
    # from when shift was an on/off setting of its own
    assert logged({"model": "fast", "mirror": "on", "shift": "on"}) == {"model": "fast", "mirror": "on", "augment": "shift"}
    assert logged({"model": "fast", "mirror": "on", "shift": "off"}) == {"model": "fast", "mirror": "on", "augment": "none"}
    assert logged({"model": "fast", "mirror": "on", "augment": "affine"}) == {"model": "fast", "mirror": "on", "augment": "affine"}


def test_run_tags_record_the_code_and_the_person():
    tags = tracking.run_tags("production", "fashion_mnist", note="Run 3")
    assert len(tags["git_commit"]) == 40
    assert tags["git_dirty"] in ("true", "false")
    assert tags["phase"] == "production" and tags["dataset"] == "fashion_mnist"
    assert tags["mlflow.note.content"] == "Run 3"
    assert "mlflow.note.content" not in tracking.run_tags("development", "mnist")


def test_importing_mnistflow_sets_mlflow_defaults_but_keeps_the_users():
    show = "import os, mnistflow; print(os.environ['MLFLOW_DEFAULT_PREDICTION_DEVICE'])"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DEFAULT_PREDICTION_DEVICE"}
    # cpu: logged pt2 models cannot be moved to a GPU, where MLflow would otherwise load them.
    for users_value, expected in ((None, "cpu"), ("cuda:1", "cuda:1")):
        if users_value:
            env["MLFLOW_DEFAULT_PREDICTION_DEVICE"] = users_value
        assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True,
                              check=True).stdout == expected + "\n"


def a_run() -> str:
    with mlflow.start_run() as run:
        pass
    return run.info.run_id


def holder(**changes) -> tracking.Holder:
    """What a lease's param says of its process: this one, unless `changes` say otherwise."""
    return dataclasses.replace(tracking.Holder.this_process(), **changes)


def held_by(run_id: str, number: int, lease_holder: tracking.Holder) -> None:
    """Write lease `number` as its holder would have: another process, maybe on another machine."""
    mlflow.MlflowClient().log_param(run_id, f"{tracking.LEASE_PARAM}{number}", lease_holder.value())


def taken_as(run_id: str) -> int:
    """Take the run's lease, release it (this test goes on writing leases), and say which it was."""
    with tracking.take_lease(run_id) as lease:
        return lease.number


def refusal(run_id: str) -> str:
    with pytest.raises(ConfigError) as refused:
        tracking.take_lease(run_id)
    return str(refused.value)


def test_of_two_processes_taking_a_run_at_once_exactly_one_gets_it(store):
    run_id = a_run()
    together = threading.Barrier(2)
    outcomes = []

    def take() -> None:
        together.wait()
        try:
            outcomes.append(tracking.take_lease(run_id))
        except ConfigError as refused:
            outcomes.append(str(refused))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [lease] = [o for o in outcomes if isinstance(o, tracking.Lease)]
    [refused] = [o for o in outcomes if isinstance(o, str)]
    # Whether it read the lease taken, or lost the write: one line naming the holder.
    assert refused.startswith(f"run {run_id} is held by process {os.getpid()} on {socket.gethostname()} (")
    assert [key for key in mlflow.get_run(run_id).data.params] == ["lease_1"]  # the loser wrote nothing
    lease.release()
    with tracking.take_lease(run_id) as next_one:  # released: free for the next one
        assert next_one.number == 2


def test_a_lease_holds_while_its_own_process_lives_not_a_pid_alone(store):
    run_id = a_run()
    held_by(run_id, 1, holder())
    assert "is running on this machine" in refusal(run_id)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held_by(run_id, 2, holder(pid=dead.pid))
    assert taken_as(run_id) == 3

    # The pid of a process that died, reused by another one (this one): the start time tells them apart.
    held_by(run_id, 4, holder(started="1"))
    assert taken_as(run_id) == 5


def test_a_holder_on_another_machine_of_the_same_name_is_alive_while_it_sends_heartbeats(store):
    run_id = a_run()
    client = mlflow.MlflowClient()
    # Same host name, another boot: its pid says nothing here (none such runs here, even).
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    elsewhere = holder(machine="another boot", pid=dead.pid, since=time.time() - 3600)
    held_by(run_id, 1, elsewhere)
    client.set_tag(run_id, tracking.HEARTBEAT_TAG, f"1 {time.time() - 5:.0f}")
    line = refusal(run_id)
    assert re.fullmatch(f"run {run_id} is held by process {dead.pid} on {socket.gethostname()} "
                        r"\(it runs on another machine or in another container, and said it is alive \d+ s ago; "
                        r"it counts as stopped after 60 s of silence\); resume it once that process has stopped", line)

    client.set_tag(run_id, tracking.HEARTBEAT_TAG, f"1 {time.time() - tracking.LEASE_EXPIRY_S - 1:.0f}")
    assert taken_as(run_id) == 2  # silent too long: taken over

    held_by(run_id, 3, dataclasses.replace(elsewhere, since=time.time()))  # no heartbeat yet: since counts
    assert "said it is alive" in refusal(run_id)
    client.set_tag(run_id, tracking.RELEASED_TAG, "3")
    assert taken_as(run_id) == 4  # its holder said it is done


def test_a_running_run_from_before_leases_is_alive_while_it_wrote_recently(store):
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name("tests").experiment_id
    long_ago_ms = int((time.time() - 3600) * 1000)
    for last_write_ms, alive in ((int(time.time() * 1000), True), (long_ago_ms, False)):
        run_id = client.create_run(experiment_id, start_time=long_ago_ms).info.run_id  # RUNNING
        client.log_metric(run_id, "epoch_time_s", 100.0, timestamp=last_write_ms, step=1)
        if alive:  # silent for less than twice its longest epoch
            assert "less than 200 s" in refusal(run_id)
        else:
            assert taken_as(run_id) == 1
