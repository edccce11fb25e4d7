"""The MLflow UI in a real headless Chromium (Debian's `chromium` and `chromedriver`, driven by
Selenium), on a real `mlflow server` over what the steps logged: a train run with its plots, a
tune study with its trials, the registered model behind @production and the logged model it was
made from. Each test opens one page by its URL, as a user's bookmark would, waits for what it
should show, saves a screenshot (also to $MNISTFLOW_SCREENSHOTS when set), then checks the page's text.
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

import mlflow
import PIL.Image
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.command import Command
from selenium.webdriver.support.ui import WebDriverWait

from conftest import EXPERIMENT, free_port, require, step_env, steps_in_this_process, wait_until_up
from mnistflow import tuning

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MODEL_NAME = "MNIST_CNN"
ALIAS = re.compile(r"^Aliases\n:\n@ ?production$", re.MULTILINE)  # as the version page shows it
PAGE_TIMEOUT_S = 60  # a page's first load fetches the UI's scripts; slow on a busy CI machine


@dataclass
class Logged:
    """What the steps logged into the store the UI shows."""
    experiment_id: str
    train: mlflow.entities.Run
    study: mlflow.entities.Run
    trials: list[mlflow.entities.Run]
    model_id: str  # the train run's logged model, registered as MODEL_NAME version 1


def run_the_steps(uri: str, experiment_id: str, data_dir: str, root) -> Logged:
    """Fill the store as `python -m steps.<step>` would, in this process (seconds, not minutes):
    train, tune (2 trials), register (the train run, through a gate the tiny data passes on any
    machine) and plot_loss."""
    from steps import plot_loss, register, train, tune

    with steps_in_this_process(uri):
        train.main(["--data_dir", data_dir, "--epochs", "1", "--batch_size", "64"])
        train_id = mlflow.last_active_run().info.run_id
        tune.main(["--data_dir", data_dir, "--n_trials", "2", "--epochs", "1", "--pruner", "none",
                   "--storage", f"sqlite:///{root / 'optuna.db'}"])
        register.main(["--run_id", train_id, "--data_dir", data_dir, "--min_accuracy", "0.01",
                       "--recall_margin", "1", "--max_latency_ms", "100000", "--min_robust_accuracy", "0"])
        plot_loss.main(["--run_id", train_id, "--out", str(root / "plot_loss.png")])
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([experiment_id])
    [study] = [run for run in runs if "study_name" in run.data.tags]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    model_id = client.get_model_version(MODEL_NAME, "1").source.removeprefix("models:/")
    return Logged(experiment_id, client.get_run(train_id), study, trials, model_id)


@contextlib.contextmanager
def mlflow_ui(uri: str, cwd, while_it_starts=lambda: None):
    """A real `mlflow server` on the store at `uri`; its address, once it answers. It starts first,
    so that it loads while `while_it_starts()` runs. Its job runner (GenAI judges, trace
    roll-ups: nothing these pages use) would start eight more Python processes."""
    require(bool(CHROMIUM and CHROMEDRIVER), "Chromium with chromedriver", "chromium chromium-driver")
    port = free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=cwd,
                              env={**step_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while_it_starts()
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/health", server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# Chromium looks up Google's update, sync and autofill hosts on its own: it resolves no name but
# the loopback ones and starts no background traffic, so the tests talk to this machine only.
LOOPBACK_ONLY = ("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check")


@contextlib.contextmanager
def chromium(url: str):
    """A headless Chromium with a 1600x1200 page, at the UI. The binaries are given by path, so
    Selenium Manager never looks for (or downloads) a browser or driver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", *LOOPBACK_ONLY):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1600, "height": 1200, "deviceScaleFactor": 1, "mobile": False})
        driver.get(url)
        # MLflow 3.17 opens its AI assistant beside every page on a first visit; a user closes it
        # once and the UI remembers that here. Closed, the page gets the screenshot's full width.
        driver.execute_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                              "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_data) -> tuple[str, Logged]:
    """A real `mlflow server` on a store the steps filled: the UI's address, and what is in the store."""
    root = tmp_path_factory.mktemp("ui_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment_id = mlflow.MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    logged = []
    with mlflow_ui(uri, root, lambda: logged.append(run_the_steps(uri, experiment_id, tiny_data, root))) as url:
        yield url, logged[0]


@pytest.fixture(scope="module")
def browser(ui):
    with chromium(ui[0]) as driver:
        yield driver


def screenshot(driver, name: str, folder) -> None:
    """Save the page as <name>.png in `folder`, and in $MNISTFLOW_SCREENSHOTS when set."""
    for where in filter(None, [str(folder), os.environ.get("MNISTFLOW_SCREENSHOTS")]):
        os.makedirs(where, exist_ok=True)
        assert driver.save_screenshot(os.path.join(where, f"{name}.png"))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    return lambda driver, name: screenshot(driver, name, folder)


def until(driver, condition):
    """The first true value of `condition(driver)`, tried again while false, and while the page
    re-renders under it: the UI (React) replaces elements as it updates, and an element found a
    moment before is then stale. TimeoutException after PAGE_TIMEOUT_S."""
    return WebDriverWait(driver, PAGE_TIMEOUT_S, ignored_exceptions=[StaleElementReferenceException]).until(condition)


def page_text(driver) -> str:
    return until(driver, lambda d: [d.find_element(By.TAG_NAME, "body").text])[0]  # [text]: true even if empty


def wait_for(driver, shown) -> str:
    """Wait until `shown(driver)` is true, at most PAGE_TIMEOUT_S: the UI is a single-page app
    that fills the page piece by piece after it loads. Return the page's text. A page that never
    shows it fails the test, with the page's text: a wait that runs out is never a pass."""
    try:
        until(driver, shown)
    except TimeoutException:
        pytest.fail(f"the page did not show what the test waits for within {PAGE_TIMEOUT_S} s; it shows:\n"
                    f"{page_text(driver)}")
    return page_text(driver)


def open_page(driver, url: str, shown) -> str:
    driver.get(url)
    return wait_for(driver, shown)


# The links to a UI route (`#/...`) that the page shows, found in one script: the page cannot
# re-render in the middle of it.
VISIBLE_LINKS = """[...document.querySelectorAll(`a[href="${arguments[0]}"]`)].filter(
    a => a.checkVisibility({visibilityProperty: true, opacityProperty: true}) && a.getClientRects().length)"""


def link_texts(driver, route: str) -> list[str]:
    """The text of each link to this UI route the page shows."""
    return driver.execute_script(f"return {VISIBLE_LINKS}.map(a => a.innerText)", route)


def link_to(route: str):
    """A wait condition: the page shows a link to this UI route."""
    return lambda driver: link_texts(driver, route)


def click(driver, find) -> None:
    """Click the element `find(driver)` returns, as a user would, once it is there; found again if
    the page replaced it before the click."""
    def clicked(d) -> bool:
        element = find(d)
        if element is not None:
            element.click()
        return element is not None
    until(driver, clicked)


def click_link(driver, route: str) -> None:
    click(driver, lambda d: next(iter(d.execute_script(f"return {VISIBLE_LINKS}", route)), None))


def run_route(logged: Logged, run_id: str) -> str:
    return f"#/experiments/{logged.experiment_id}/runs/{run_id}"


def expand(driver, experiment_id: str, parent_id: str, child_ids: list[str]) -> None:
    """In the runs list, click a parent run's (+) button and wait until its child runs show."""
    button = f'.ag-row[row-id="{parent_id}"] [col-id="attributes.`Run Name`"] button'
    click(driver, lambda d: d.find_element(By.CSS_SELECTOR, button))
    wait_for(driver, lambda d: all(link_to(f"#/experiments/{experiment_id}/runs/{child}")(d) for child in child_ids))


def shown_runs(driver) -> list[tuple[str, str, float]]:
    """The runs table as shown, top to bottom: each row's run id, run name and how far right it starts (px)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(a => {"
        "  const box = a.getBoundingClientRect();"
        "  return [a.getAttribute('href').split('/').pop(), a.innerText, box.x, box.y]; })",
        '.ag-row [col-id="attributes.`Run Name`"] a[href*="/runs/"]')
    return [(run_id, name, x) for run_id, name, x, _ in sorted(rows, key=lambda row: row[3])]


def run_names(driver) -> list[str]:
    """The names of the runs table's rows, sorted."""
    return sorted(name for _, name, _ in shown_runs(driver))


def nested_under(driver, parent_id: str, count: int) -> list[str]:
    """The names of the `count` rows right below the parent's row that are indented under it, sorted."""
    shown = shown_runs(driver)
    ids = [run_id for run_id, _, _ in shown]
    if parent_id not in ids:
        return []
    at = ids.index(parent_id)
    return sorted(name for _, name, x in shown[at + 1:at + 1 + count] if x > shown[at][2])


def test_the_runs_list_names_every_run_and_groups_the_trials_under_their_study(ui, browser, screenshots):
    url, logged = ui
    study, train = logged.study.info.run_name, logged.train.info.run_name
    trials = sorted(run.info.run_name for run in logged.trials)
    params = logged.train.data.params
    assert train == f"train-{params['resolved_model']}-{params['dataset']}"  # what the list must show
    assert re.fullmatch(r"study-.+", study) and trials == ["trial-0", "trial-1"]

    # Collapsed, the study is one row: its trials are nested under it, not beside it.
    collapsed = sorted([f"register-{MODEL_NAME}", study, train])
    open_page(browser, f"{url}/#/experiments/{logged.experiment_id}/runs",
              lambda driver: run_names(driver) == collapsed)
    assert run_names(browser) == collapsed
    study_id = logged.study.info.run_id
    expand(browser, logged.experiment_id, study_id, [run.info.run_id for run in logged.trials])
    # Expanded, the trials are the rows right below their study, indented under it (once the
    # table's rows have slid into place).
    wait_for(browser, lambda driver: nested_under(driver, study_id, len(trials)) == trials)
    screenshots(browser, "runs_with_trials")
    assert nested_under(browser, study_id, len(trials)) == trials
    assert run_names(browser) == sorted([*collapsed, *trials])


def test_the_best_trial_is_marked_on_its_own_page(ui, browser, screenshots):
    url, logged = ui
    [best] = [run for run in logged.trials if run.data.tags.get(tuning.BEST_TRIAL_TAG) == "true"]
    study_route = run_route(logged, logged.study.info.run_id)
    marked = re.compile(r"^best_trial\n: true$", re.MULTILINE)
    text = open_page(browser, f"{url}/{run_route(logged, best.info.run_id)}",
                     lambda driver: marked.search(page_text(driver)) and link_to(study_route)(driver))
    screenshots(browser, "best_trial")
    assert marked.search(text), text
    assert best.info.run_name in text
    # Its page links up to the study it belongs to.
    assert link_texts(browser, study_route) == [logged.study.info.run_name]


def test_the_train_runs_plot_opens_in_the_artifact_view(ui, browser, screenshots):
    url, logged = ui
    artifact = "plots/plot_loss.png"

    def image_size(driver) -> list | None:
        # The viewer shows the PNG it fetched from the server; drawn once the browser decoded it.
        return driver.execute_script(
            "const img = document.querySelector(`img[alt='${arguments[0]}']`);"
            "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;", artifact)

    text = open_page(browser, f"{url}/{run_route(logged, logged.train.info.run_id)}/artifactPath/{artifact}",
                     lambda driver: image_size(driver) and logged.train.info.run_name in page_text(driver))
    screenshots(browser, "train_plot_loss")
    assert logged.train.info.run_name in text and artifact in text
    with PIL.Image.open(os.path.join(logged.train.info.artifact_uri, artifact)) as logged_png:
        assert image_size(browser) == list(logged_png.size)  # that very figure, not a broken-image icon


def test_the_model_version_shows_its_alias_and_links_to_its_source_run(ui, browser, screenshots):
    url, logged = ui
    train_route = run_route(logged, logged.train.info.run_id)
    text = open_page(browser, f"{url}/#/models/{MODEL_NAME}/versions/1",
                     lambda driver: link_to(train_route)(driver) and ALIAS.search(page_text(driver)))
    screenshots(browser, "model_version")
    assert f"{MODEL_NAME}\nVersion 1" in text
    assert ALIAS.search(text), text
    assert link_texts(browser, train_route) == [logged.train.info.run_name]
    click_link(browser, train_route)  # the link opens the run's own page
    text = wait_for(browser, lambda driver: driver.current_url.endswith(train_route)
                    and "Model metrics" in page_text(driver))
    assert browser.current_url.endswith(train_route) and "Model metrics" in text


def open_logged_model(url: str, logged: Logged, browser, screenshots, shown) -> str:
    """Open the train run's logged model and wait until `shown(driver)`; the page's text."""
    text = open_page(browser, f"{url}/#/experiments/{logged.experiment_id}/models/{logged.model_id}", shown)
    screenshots(browser, "logged_model")
    return text


def test_the_logged_model_shows_it_is_registered(ui, browser, screenshots):
    url, logged = ui
    version_route = f"#/models/{MODEL_NAME}/versions/1"
    text = open_logged_model(url, logged, browser, screenshots, link_to(version_route))
    # Not "Not registered": the version made from it is listed, with a link to it.
    assert "Not registered" not in text
    assert [link.split() for link in link_texts(browser, version_route)] == [[MODEL_NAME, "v1"]]


def test_the_logged_model_names_the_dataset_it_was_measured_on(ui, browser, screenshots):
    url, logged = ui
    # Its test metrics were logged against the test dataset and the model.
    measured_on = re.compile(r"^Datasets used\nmnist-test \(#[0-9a-f]+\)$", re.MULTILINE)
    text = open_logged_model(url, logged, browser, screenshots, lambda driver: measured_on.search(page_text(driver)))
    assert measured_on.search(text), text


# React may replace any element of the page between two WebDriver commands. This does it every time.
RE_RENDER = "document.querySelectorAll('#root > *').forEach(app => app.replaceWith(app.cloneNode(true)))"


@contextlib.contextmanager
def re_rendered_before_every_command(driver):
    """Within: before each WebDriver command, the page's app is replaced by a copy of itself, so
    an element one command found is stale in the next. After: the page is loaded afresh (the
    copy is not the live app)."""
    execute = driver.execute

    def after_a_re_render(command, params=None):
        execute(Command.W3C_EXECUTE_SCRIPT, {"script": RE_RENDER, "args": []})
        return execute(command, params)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(driver, "execute", after_a_re_render)
            yield
    finally:
        driver.refresh()


def test_the_pages_read_alike_while_they_re_render(ui, browser):
    """What the tests above read (their wait conditions, link texts, the runs table, the page's
    text) reads the same on a page that keeps replacing its elements."""
    url, logged = ui
    version_route = f"#/models/{MODEL_NAME}/versions/1"
    text = open_page(browser, f"{url}/#/experiments/{logged.experiment_id}/models/{logged.model_id}",
                     link_to(version_route))
    links = link_texts(browser, version_route)
    with re_rendered_before_every_command(browser):
        assert (wait_for(browser, link_to(version_route)), link_texts(browser, version_route)) == (text, links)

    runs = f"{url}/#/experiments/{logged.experiment_id}/runs"
    browser.execute_script("localStorage.clear()")  # the UI keeps which runs a test above expanded there
    open_page(browser, runs, lambda driver: len(shown_runs(driver)) == 3)
    shown = shown_runs(browser)
    with re_rendered_before_every_command(browser):
        assert wait_for(browser, lambda driver: shown_runs(driver) == shown) and shown_runs(browser) == shown


def look_at_the_pipeline_run(uri: str, cwd, pipeline_run: mlflow.entities.Run, steps: dict, folder) -> None:
    """For test_pipeline.py, on the store its `mlflow run .` filled: the pipeline run's page shows
    its description with a link to each step's run, and in the runs list its step runs are
    nested under it, each by a name that says what it is."""
    experiment_id, pipeline_id = pipeline_run.info.experiment_id, pipeline_run.info.run_id
    step_routes = {f"#/experiments/{experiment_id}/runs/{run.info.run_id}": run.info.run_name for run in steps.values()}
    with mlflow_ui(uri, cwd) as url, chromium(url) as driver:
        described = re.compile(r"Registered Pipeline version 1 @production\. The steps:")
        text = open_page(driver, f"{url}/#/experiments/{experiment_id}/runs/{pipeline_id}",
                         lambda d: all(link_to(route)(d) for route in step_routes) and described.search(page_text(d)))
        screenshot(driver, "pipeline_run", folder)
        assert described.search(text), text
        for route, name in step_routes.items():  # each step's link, named as its run
            assert name in link_texts(driver, route), (route, name)

        open_page(driver, f"{url}/#/experiments/{experiment_id}/runs",
                  link_to(f"#/experiments/{experiment_id}/runs/{pipeline_id}"))
        expand(driver, experiment_id, pipeline_id, [run.info.run_id for run in steps.values()])
        step_names = sorted(step_routes.values())
        wait_for(driver, lambda d: nested_under(d, pipeline_id, len(steps)) == step_names)
        screenshot(driver, "pipeline_runs", folder)
        assert nested_under(driver, pipeline_id, len(steps)) == step_names
