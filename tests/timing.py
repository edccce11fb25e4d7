"""Where the suite's time goes, and how it is spent: a pytest plugin (conftest.py loads it).

- Each test's time (setup, call and teardown) is kept in tests/durations.json; `--record-durations`
  writes it from the run that just finished (`make durations`, with each results update).
- The slowest files are collected first, so that `--dist loadfile --no-loadscope-reorder` hands
  them out first: the last file a worker gets is a short one, not the longest of all.
- Each xdist worker, and every process it starts, gets an equal share of the cores for PyTorch's
  threads: two workers with a thread per core each would fight over every core.
- `--quick` (`make quick`) keeps only the quick tests: recorded under QUICK_S seconds and using no
  module- or session-wide fixture other than the cheap ones below (those start servers and stores).
"""
import json
import os

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
QUICK_S = 2.0
CHEAP_SHARED_FIXTURES = {"tiny_data", "tmp_path_factory", "monkeypatch_session", "worker_id", "testrun_uid"}
UNKNOWN_S = 1.0  # a test not yet in durations.json: counted as a quick one until recorded


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="only the quick tests (no servers): the edit loop's tier")
    parser.addoption("--record-durations", action="store_true", help=f"write each test's time to {DURATIONS}")


def threads_per_worker() -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the xdist controller runs no test; its workers, which inherit its environment, decide
    # Before any test module imports torch, and inherited by every process a test starts.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads_per_worker()))


SECONDS: dict[str, float] = {}  # this run's time per test, summed over setup, call and teardown


def recorded() -> dict[str, float]:
    try:
        with open(DURATIONS) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def is_quick(item, seconds: float) -> bool:
    shared = {name for name, definitions in item._fixtureinfo.name2fixturedefs.items()
              if definitions[-1].scope in ("module", "session")}
    return seconds < QUICK_S and shared <= CHEAP_SHARED_FIXTURES


def pytest_collection_modifyitems(config, items):
    durations = recorded()
    seconds = {item.nodeid: durations.get(item.nodeid, UNKNOWN_S) for item in items}
    if config.getoption("--quick"):
        slow = [item for item in items if not is_quick(item, seconds[item.nodeid])]
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if is_quick(item, seconds[item.nodeid])]
    per_file: dict[str, float] = {}
    for item in items:
        per_file[item.location[0]] = per_file.get(item.location[0], 0.0) + seconds[item.nodeid]
    items.sort(key=lambda item: -per_file[item.location[0]])  # stable: a file's tests keep their order


def pytest_runtest_logreport(report):
    # Called on the xdist controller too, with every worker's reports.
    SECONDS[report.nodeid] = SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    config = session.config
    if not config.getoption("--record-durations") or hasattr(config, "workerinput"):
        return  # a worker: the controller writes the file
    # A file run this time is recorded anew (a renamed test leaves no entry behind); the others stay.
    files_run = {nodeid.split("::")[0] for nodeid in SECONDS}
    durations = {nodeid: seconds for nodeid, seconds in recorded().items()
                 if nodeid.split("::")[0] not in files_run and (config.rootpath / nodeid.split("::")[0]).exists()}
    durations.update({nodeid: round(seconds, 2) for nodeid, seconds in SECONDS.items()})
    with open(DURATIONS, "w") as f:
        json.dump(dict(sorted(durations.items())), f, indent=0)
        f.write("\n")
