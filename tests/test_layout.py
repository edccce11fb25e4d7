"""Data flows one way: a core module imports only modules below it, and no step imports another."""
import ast
import os
import sys

import pytest

from conftest import ROOT

# The core package's layers, top to bottom, as README.md and docs/design.md draw them: a module
# imports only modules on the rows below it, or to its right on its own row.
LAYERS = [
    (["cli"], "around each step: flags → access check → work → one-line error"),
    (["pipeline", "workers", "slurm", "rollout"], "what the steps do: the chain, tune's workers (local, Slurm), "
                                                  "versions behind nginx"),
    (["tuning", "registry", "plot_loss", "serving", "monitoring"], "a study's trials, the gated registry, loss plots, "
                                                                   "a model process, the monitor's judgement"),
    (["reading", "robustness", "logged_model", "tensorboard_log", "inference_log"],
     "numbers read, robustness, the one logged model form, event files, what was served"),
    (["report", "checkpoints", "tracking"], "test reports, checkpoints, runs (step_run opens each)"),
    (["train", "plots", "metrics", "images"], "fit (the loop, no MLflow), figures, scores, pictures"),
    (["models", "augment", "data"], "the nets, augmentation, the datasets"),
    (["keystore", "auth", "cli_guard"], "API keys (server, client) · the `mlflow run` check"),
    (["config"], "each step's settings: default, meaning, checks"),
    (["flags", "errors", "nginx"], "command lines and --help · error kinds and exit codes · nginx's account"),
]
# Bottom to top: each module may import only the ones before it.
ORDER = [module for modules, _ in reversed(LAYERS) for module in reversed(modules)]


def diagram() -> str:
    """The rows of mnistflow/ in the layout diagrams."""
    width = max(len(" · ".join(modules)) for modules, _ in LAYERS)
    return "\n".join(f"    {' · '.join(modules):<{width}}  {what}" for modules, what in LAYERS)


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_the_layout_diagrams_draw_the_layers(doc):
    with open(os.path.join(ROOT, doc)) as f:
        assert diagram() in f.read(), f"{doc} should draw mnistflow/ as:\n{diagram()}"


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


STEPS = sorted(name for name in os.listdir(os.path.join(ROOT, "steps")) if name.endswith(".py"))
LIGHT = {"mnistflow.cli", "mnistflow.config", "mnistflow.errors"}  # what a step may import at its top


def calls(path: str, function: str) -> int:
    """How many times the file at `path` calls `function`, by its name or as an attribute (tracking.x)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return sum(isinstance(node, ast.Call)
               and function in (getattr(node.func, "id", None), getattr(node.func, "attr", None))
               for node in ast.walk(tree))


@pytest.mark.parametrize("name", STEPS)
def test_a_step_reads_in_one_screen(name):
    with open(os.path.join(ROOT, "steps", name)) as f:
        assert len(f.readlines()) <= 80


@pytest.mark.parametrize("function", ["start_run", "tracked_run", "log_config", "run_tags"])
def test_one_place_opens_a_run_and_sets_it_up(function):
    # tracking.step_run: each step's run gets its name, params, tags, datasets and the `mlflow run` rule there.
    sources = [os.path.join(ROOT, "mnistflow", name) for name in sorted(os.listdir(os.path.join(ROOT, "mnistflow")))
               if name.endswith(".py")] + [os.path.join(ROOT, "steps", name) for name in STEPS]
    callers = {os.path.relpath(path, ROOT): count for path in sources if (count := calls(path, function))}
    assert callers == {"mnistflow/tracking.py": 1}


@pytest.mark.parametrize("name", STEPS)
def test_a_step_imports_only_the_standard_library_and_light_modules_at_its_top(name):
    # torch, MLflow and the rest load inside the function that does the step's work: --help does not wait for them.
    with open(os.path.join(ROOT, "steps", name)) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "mnistflow":
            modules = [f"mnistflow.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module]
        else:
            continue
        for module in modules:
            assert module in LIGHT or module.split(".")[0] in sys.stdlib_module_names, f"{name} imports {module}"
