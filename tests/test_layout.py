"""Data flows one way: a core module imports only modules below it, and no step imports another."""
import ast
import os

import pytest

from conftest import ROOT

# Bottom to top: each module may import only the ones before it.
ORDER = ["errors", "flags", "config", "data", "augment", "models", "images", "metrics", "plots", "train", "tracking",
         "checkpoints", "report", "tensorboard_log", "logged_model", "robustness", "plot_loss", "registry", "tuning",
         "slurm", "pipeline", "cli_guard", "auth", "keystore", "cli"]


def imported(path: str, package: str) -> set[str]:
    """The modules of `package` that the file at `path` imports."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith(package + ".")}
    return found


def test_every_core_module_has_its_place():
    modules = {name[:-3] for name in os.listdir(os.path.join(ROOT, "mnistflow")) if name.endswith(".py")}
    assert modules - {"__init__"} == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_a_core_module_imports_only_modules_below_it(module):
    below = set(ORDER[:ORDER.index(module)])
    assert imported(os.path.join(ROOT, "mnistflow", f"{module}.py"), "mnistflow") <= below


def test_no_step_imports_another():
    for name in os.listdir(os.path.join(ROOT, "steps")):
        if name.endswith(".py"):
            assert imported(os.path.join(ROOT, "steps", name), "steps") == set(), name
