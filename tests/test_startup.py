"""What a process loads before it has work to do: a server script answers --help and a bad flag
without PyTorch or MLflow (seconds each), and torchvision, which pulls in torch._dynamo, is loaded
only to download a dataset. bench/startup.py measures what these cost."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("torch", "mlflow", "torchvision")
# Runs a script as `python script args` would, then says on stderr's last line which of HEAVY it loaded.
RUN_AND_LIST_HEAVY = (
    "import atexit, json, os, runpy, sys\n"
    f"atexit.register(lambda: print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "serverFolder", "*.py")))


def heavy_modules_loaded(*args: str) -> tuple[int, list[str]]:
    """(exit code, the HEAVY modules loaded) of `python -c <code> args` run from the project root, so
    that this checkout's mnistflow is the one imported."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return result.returncode, json.loads(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
@pytest.mark.parametrize("flag, exit_code", [("--help", 0), ("--no-such-flag", 2)])
def test_a_server_script_reads_its_flags_without_torch_or_mlflow(script, flag, exit_code):
    assert heavy_modules_loaded("-c", RUN_AND_LIST_HEAVY, script, flag) == (exit_code, [])


def test_the_modules_that_read_flags_load_neither_torch_nor_mlflow():
    # What a step runs before its flags are read (mnistflow.cli), and what the server scripts use.
    code = ("import json, sys, mnistflow.cli, mnistflow.config, mnistflow.errors, mnistflow.auth, mnistflow.keystore\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    assert heavy_modules_loaded("-c", code) == (0, [])


def test_no_core_module_loads_torchvision():
    modules = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "mnistflow"))
                     if name.endswith(".py") and name != "__init__.py")
    code = (f"import json, sys, {', '.join(f'mnistflow.{name}' for name in modules)}\n"
            "print(json.dumps([m for m in ('torchvision',) if m in sys.modules]), file=sys.stderr)")
    assert heavy_modules_loaded("-c", code) == (0, [])


STEPS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "steps"))
               if name.endswith(".py") and name != "__init__.py")
# Runs `python -m steps.<step> args`, then says on stderr's last line which of HEAVY it loaded.
RUN_STEP_AND_LIST_HEAVY = RUN_AND_LIST_HEAVY.replace(
    "sys.path.insert(0, os.path.dirname(sys.argv[0]))\nrunpy.run_path(sys.argv[0], run_name='__main__')\n",
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("flag, exit_code", [("--help", 0), ("--no-such-flag", 2)])
def test_a_step_reads_its_flags_without_torch_or_mlflow(step, flag, exit_code):
    assert heavy_modules_loaded("-c", RUN_STEP_AND_LIST_HEAVY, f"steps.{step}", flag) == (exit_code, [])
