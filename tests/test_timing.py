"""tests/timing.py, the plugin that schedules the suite: run on a small suite of its own."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from timing import threads_per_worker

SUITE = {
    "test_short.py": "def test_one():\n    pass\n\n\ndef test_two():\n    pass\n",
    "test_long.py": ("import pytest\n\n\n@pytest.fixture(scope='module')\ndef server():\n    return 'up'\n\n\n"
                     "def test_uses_a_server(server):\n    pass\n\n\ndef test_slow():\n    pass\n\n\n"
                     "def test_fast():\n    pass\n"),
}
RECORDED = {"test_short.py::test_one": 0.1, "test_short.py::test_two": 0.1, "test_long.py::test_uses_a_server": 0.5,
            "test_long.py::test_slow": 30.0, "test_long.py::test_fast": 0.1}


@pytest.fixture
def suite(tmp_path):
    shutil.copy(os.path.join(ROOT, "tests", "timing.py"), tmp_path)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["timing"]\n')
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "durations.json").write_text(json.dumps(RECORDED))
    return tmp_path


def pytest_in(folder, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=folder,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_the_slowest_file_is_collected_first_its_tests_in_order(suite):
    assert pytest_in(suite, "--collect-only") == [
        "test_long.py::test_uses_a_server", "test_long.py::test_slow", "test_long.py::test_fast",
        "test_short.py::test_one", "test_short.py::test_two"]


def test_quick_leaves_out_slow_tests_and_tests_on_a_shared_fixture(suite):
    assert pytest_in(suite, "--collect-only", "--quick") == [
        "test_short.py::test_one", "test_short.py::test_two", "test_long.py::test_fast"]


def test_record_durations_writes_this_runs_times_and_keeps_the_other_files(suite):
    recorded = json.loads((suite / "durations.json").read_text())
    (suite / "durations.json").write_text(json.dumps({**recorded, "test_short.py::test_renamed_since": 9.0}))
    pytest_in(suite, "--record-durations", "test_short.py")
    durations = json.loads((suite / "durations.json").read_text())
    assert set(durations) == set(RECORDED) and durations["test_short.py::test_one"] < 5
    assert durations["test_long.py::test_slow"] == 30.0


def test_each_worker_gets_its_share_of_the_cores():
    # Under `make test` (two workers) on two cores: one thread each, here and in what the tests start.
    assert os.environ["OMP_NUM_THREADS"] == str(threads_per_worker())
    assert torch.get_num_threads() == threads_per_worker()


def test_make_runs_the_suite_the_quick_tier_and_the_recording_alike():
    result = subprocess.run(["make", "--dry-run", "--always-make", "test", "quick", "durations"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    pytest_lines = [line for line in result.stdout.splitlines() if line.startswith("python -m pytest")]
    base = "python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder"
    assert pytest_lines == [base, f"{base} --quick", f"{base} --record-durations"], result.stdout
