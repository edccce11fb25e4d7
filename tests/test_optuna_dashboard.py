"""optuna-dashboard, the real server, on a study the tune step made: it reads the study and its
trials back as the tune step left them."""
import json
import os
import signal
import subprocess
import sys
import urllib.request

from conftest import ROOT, free_port, python_step, step_env, wait_until_up


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_optuna_dashboard_shows_the_study_the_tune_step_made(store, tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    made = python_step("steps.tune", "--storage", storage, "--data_dir", tiny_data, "--study_name", "shown",
                       "--n_trials", "3", "--epochs", "1", "--pruner", "none")
    assert made.returncode == 0, made.stderr[-2000:]

    port = free_port()
    dashboard = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "optuna-dashboard"), storage,
                                  "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                 cwd=ROOT, env=step_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/api/meta", dashboard)
        [study] = get(f"{url}/api/studies")["study_summaries"]
        assert study["study_name"] == "shown" and study["directions"] == ["maximize"]
        detail = get(f"{url}/api/studies/{study['study_id']}")
        trials = detail["trials"]
        assert [trial["state"] for trial in trials] == ["Complete"] * 3
        assert all({"lr", "batch_size"} <= {p["name"] for p in trial["params"]} for trial in trials)
        # The trial's MLflow run is one click away: its run id is a user attribute.
        assert all(any(attr["key"] == "mlflow_run_id" for attr in trial["user_attrs"]) for trial in trials)
        [best] = detail["best_trials"]
        assert best["values"] == [max(trial["values"][0] for trial in trials)]
    finally:
        os.killpg(dashboard.pid, signal.SIGTERM)
        dashboard.wait(timeout=30)
