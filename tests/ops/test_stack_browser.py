"""The local stack for real, driven like a user in headless Chromium (Debian's, via Playwright):

1. start the stack, deploy, open the Prefect UI, open the full-pipeline deployment: the Run form's
   first screen holds the fields people change, the rest is folded; change one of them, start
   the run by clicking, wait in the UI until it completes; then
   check through MLflow's API: a parent run with every stage as a child run, their artifacts, and
   the changed parameter;
2. open the MLflow UI, navigate to that run, open the artifacts tree and the HTML report;
3. the nightly deployment shows its schedule (02:00, local zone) in the UI;
plus: deploying twice changes nothing, starting twice starts nothing, two nightly runs at once ->
the second is cancelled (collision strategy), and stopping leaves no process behind.

Every page visited is saved as a screenshot in test-artifacts/. Select with `-m browser`.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from flows.ops.stack import Stack, free_port, local_timezone
from tasks.runtime.paths import REPO_DIR
from tests._browser import CHROMIUM, CHROMIUM_ARGS, SHOTS, Api, shot
from tasks.config import PipelineConfig
from tasks.config.run_form import deployment_parameters
from tests._ops_config import PIPELINE_STAGES, tiny

pytestmark = pytest.mark.browser

CHANGED_EPOCHS = 2.0                              # the parameter changed in the Run form
STATE_BADGE = "span[class*='bg-state-']"          # a flow run's state in the Prefect UI
#: the first screen of the Run form (tasks/config/run_form.py): each field's description
FIRST_SCREEN = {"data_file": "Your data:", "base_model": "Folder of the model to fine-tune",
                "method": "lora: the full-precision model", "epochs": "Passes over your",
                "learning_rate": "Peak learning rate.", "model_name": "Name of the model in",
                "experiment": "MLflow experiment the run"}


# ------------------------------------------------------------------------------------------------
# Fixtures: the stack, its deployments, a browser
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack of its own (own home, free ports), stopped at the end -- and checked to leave no
    process behind."""
    stack = Stack(home=tmp_path_factory.mktemp("stack-home"), prefect_port=free_port(),
                  mlflow_port=free_port())
    stack.start(timeout=300)
    try:
        yield stack
    finally:
        logs = SHOTS / "stack-logs"              # kept for CI: the services' own logs
        logs.mkdir(parents=True, exist_ok=True)
        for log in stack.dir.glob("*.log"):
            shutil.copy(log, logs / log.name)
        tree = []
        for service in ("prefect-server", "mlflow-server", "prefect-worker"):
            if (proc := stack.process(service)) is not None:
                tree += [proc] + proc.children(recursive=True)
        assert set(stack.stop()) == {"prefect-server", "mlflow-server", "prefect-worker"}
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running after stop: {alive}"
        assert stack.stop() == []                             # idempotent
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", stack.prefect_port)) != 0


@pytest.fixture(scope="module")
def api(stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="module")
def deployments(stack, api) -> dict[str, dict]:
    """`make deploy` twice (must be idempotent); then the tiny test parameters are set as the
    deployments' defaults, as an operator would in the UI."""
    first = stack.deploy()
    assert "full-pipeline" in first and "nightly-retrain" in first
    names = {"full-pipeline": "finetune-pipeline", "data-only": "data-pipeline",
             "nightly-retrain": "nightly-retrain"}
    before = {d: api.deployment(f, d) for d, f in names.items()}
    stack.deploy()
    after = {d: api.deployment(f, d) for d, f in names.items()}
    assert {d: v["id"] for d, v in after.items()} == {d: v["id"] for d, v in before.items()}
    assert len(api("POST", "/deployments/filter", json={})) == 3
    assert len(after["nightly-retrain"]["schedules"]) == 1

    # the Run form opens with the tiny config (the first screen's values; in options, the rest)
    api("PATCH", f"/deployments/{after['full-pipeline']['id']}",
        json={"parameters": deployment_parameters(PipelineConfig.model_validate(tiny()))})
    # the nightly run will retrain exactly what the UI run builds: all cache hits, then the gate
    api("PATCH", f"/deployments/{after['nightly-retrain']['id']}",
        json={"parameters": {"config": tiny(train={"epochs": CHANGED_EPOCHS}), "gate": {}}})
    return after


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():                       # `make test` installs it first (`browsers`)
        subprocess.run(["make", "browsers"], cwd=REPO_DIR, check=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def prefect_state(where) -> str:
    """The first state badge in `where`: the header of a Prefect flow-run page, or a row of the
    Runs list."""
    badge = where.locator(STATE_BADGE).first
    return badge.inner_text().strip() if badge.count() else ""


def run_row(run_link):
    """The row of the Runs list that holds the link to a flow run (its nearest enclosing element
    with a state badge)."""
    return run_link.locator("xpath=ancestor::*[.//span[contains(@class, 'bg-state-')]][1]")


def artifact_files(mlflow: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Names of all artifact files of a run, at any depth."""
    out = set()
    for a in mlflow.list_artifacts(run_id, path):
        out |= artifact_files(mlflow, run_id, a.path) if a.is_dir else {Path(a.path).name}
    return out


# ------------------------------------------------------------------------------------------------
# 1. Run the full pipeline from the Prefect UI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui_run(stack, api, deployments, browser) -> dict:
    """Deployments -> full-pipeline -> Run -> Custom run -> change the epochs -> Submit ->
    View run -> Runs: wait in the list until the run says Completed -> the run's page."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(stack.prefect_url + "/")
    page.get_by_role("link", name="Deployments").first.click()
    page.get_by_role("link", name="full-pipeline").first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    shot(page, "prefect-1-deployment")

    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    # the first screen: the fields people change, each visible without scrolling
    fields = {name: page.locator("div.group").filter(has=page.get_by_text(text)).last
              for name, text in FIRST_SCREEN.items()}
    viewport = page.viewport_size["height"]
    for name, field in fields.items():
        box = field.bounding_box()
        assert box is not None and box["y"] + box["height"] <= viewport, (name, box)
    shot(page, "prefect-2-run-form-first-screen", full_page=False)
    # everything else in the Options section, folded: the page is about two screens
    height = page.evaluate("Math.max(...[...document.querySelectorAll('*')].map("
                           "e => e.scrollHeight))")
    assert height <= 2 * viewport, f"the Run form is {height} px tall"
    epochs = fields["epochs"].locator("input").first
    assert float(epochs.input_value()) == 1.0              # the deployment's default (tiny)
    epochs.fill(str(CHANGED_EPOCHS))
    assert float(epochs.input_value()) == CHANGED_EPOCHS
    shot(page, "prefect-2-run-form")
    submit = page.get_by_role("button", name="Submit")
    submit.click()
    # once (a clean-clone CI run, 2026-11-30) a click on Submit created nothing in 90 s: click
    # again if no run exists after 30 s and the form is still there (creating one takes < 1 s)
    if not _runs_of(api, deployments["full-pipeline"]["id"], within=30) and submit.is_visible():
        submit.click()

    # the run the form created, seen through the API (the UI's "View run" toast is brief: on a
    # loaded machine it has been gone before it could be clicked)
    flow_run_id = _created_run(api, deployments["full-pipeline"]["id"], page)
    view_run = page.get_by_role("link", name="View run").first
    if view_run.is_visible():
        view_run.click()
    else:
        page.goto(f"{stack.prefect_url}/runs/flow-run/{flow_run_id}")
    page.wait_for_url(re.compile(rf"/runs/flow-run/{flow_run_id}"))
    # wait in the Runs list: the flow-run page's live run graph (WebGL, drawn in software in
    # headless Chromium) takes nearly both cores of CI's machine from the run it shows. The
    # list refreshes itself only every so often (in make test it showed the end ~40 s late),
    # so the API says when the run has ended; then the list, reloaded, must say the same.
    name = api("GET", f"/flow_runs/{flow_run_id}")["name"]
    page.get_by_role("link", name="Runs", exact=True).first.click()
    run_link = page.get_by_role("link", name=name, exact=True).first
    run_link.wait_for()
    ended = api.wait(flow_run_id)["state_name"]
    deadline, state = time.monotonic() + 60, ""
    while state != ended:
        assert time.monotonic() < deadline, f"the UI shows {state!r}, the API {ended!r}"
        page.reload()
        run_link.wait_for()
        # badges render after the links (read at once, a loaded CI machine saw none for 60 s)
        page.locator(STATE_BADGE).first.wait_for()
        state = prefect_state(run_row(run_link))
        if state != ended:
            page.wait_for_timeout(2000)
    shot(page, "prefect-3-runs")
    run_link.click()                                  # the run's page says the same
    page.wait_for_url(re.compile(rf"/runs/flow-run/{flow_run_id}"))
    page.locator("span[class*='bg-state-']").first.wait_for()
    assert prefect_state(page) == state
    shot(page, "prefect-4-flow-run")
    context.close()
    run = api("GET", f"/flow_runs/{flow_run_id}")
    assert state == "Completed", f"flow run {flow_run_id} ended {state}: see " \
                                 f"{stack.log('prefect-worker')}"
    return run


def _runs_of(api: Api, deployment_id: str, within: float) -> list[dict]:
    """The flow runs of `deployment_id`, waiting up to `within` seconds for the first."""
    deadline = time.monotonic() + within
    while not (runs := api("POST", "/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [deployment_id]}}})):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    return runs


def _created_run(api: Api, deployment_id: str, page, timeout: float = 90) -> str:
    """Id of the one flow run of `deployment_id`, waiting for the UI's submit to create it."""
    if not (runs := _runs_of(api, deployment_id, timeout)):
        shot(page, "prefect-2-after-submit")
        pytest.fail(f"Submit in the Run form created no flow run within {timeout:.0f} s "
                    f"(screenshot prefect-2-after-submit.png)")
    assert len(runs) == 1, [r["name"] for r in runs]
    return runs[0]["id"]


def test_stack_start_is_idempotent_and_healthy(stack):
    pids = {s: v["pid"] for s, v in stack.status().items()}
    assert all(pids.values())
    stack.start(timeout=60)                            # running already: nothing restarts
    assert {s: v["pid"] for s, v in stack.status().items()} == pids
    assert stack.health() == dict.fromkeys(
        ["prefect_api", "prefect_ui", "mlflow_api", "mlflow_ui", "worker"], True)
    assert (stack.home / ".stack" / "prefect-server.log").is_file()


def test_full_pipeline_started_from_the_prefect_ui(stack, ui_run):
    assert ui_run["state_type"] == "COMPLETED"
    assert ui_run["parameters"]["epochs"] == CHANGED_EPOCHS
    mlflow = MlflowClient(stack.mlflow_url)               # MLflow's API, through the server
    exp = mlflow.get_experiment_by_name("finetune-pipeline")
    parents = mlflow.search_runs([exp.experiment_id],
                                 f"tags.`prefect.flow_run_id` = '{ui_run['id']}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == str(CHANGED_EPOCHS)
    assert parent.data.tags["prefect.flow_run_url"].startswith(stack.prefect_url)
    kids = {r.info.run_name: r for r in mlflow.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert PIPELINE_STAGES <= set(kids), sorted(kids)
    assert all(k.info.status == "FINISHED" for k in kids.values())
    for name in PIPELINE_STAGES:                        # a fresh stack: every stage computed
        arts = {a.path for a in mlflow.list_artifacts(kids[name].info.run_id)}
        assert "stage_result.json" in arts, (name, arts)
    assert "report.html" in artifact_files(mlflow, kids["report"].info.run_id)
    assert "config.json" in artifact_files(mlflow, kids["merge"].info.run_id)  # the model
    versions = mlflow.search_model_versions("name = 'plant-care-chat'")
    assert [v.run_id for v in versions] == [kids["merge"].info.run_id]
    assert versions[0].source.startswith("models:/")      # an MLflow model, not a folder
    assert "generations_table.json" in artifact_files(mlflow, parent.info.run_id)


# ------------------------------------------------------------------------------------------------
# 2. Browse it in the MLflow UI
# ------------------------------------------------------------------------------------------------
def close_assistant(page) -> None:
    """Close MLflow's chat side panel if it is open (more room for the run in screenshots)."""
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


def test_browse_the_run_and_its_report_in_the_mlflow_ui(stack, ui_run, page):
    page.goto(stack.mlflow_url + "/")
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name="finetune-pipeline").first.click()
    page.wait_for_url(re.compile(r"#/experiments/\d+"))
    run_link = page.get_by_role("link", name=f"pipeline-{ui_run['name']}")
    run_link.first.wait_for()
    shot(page, "mlflow-1-experiment")
    run_link.first.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f]{32}"))
    close_assistant(page)
    epochs = page.get_by_text("train.epochs", exact=True).first
    epochs.scroll_into_view_if_needed()        # the changed parameter, in the params table
    shot(page, "mlflow-2-run")

    page.get_by_role("link", name="report", exact=True).first.click()    # its child run
    page.wait_for_url(re.compile(r"/runs/[0-9a-f]{32}"))
    page.get_by_role("tab", name="Artifacts").first.click()
    page.get_by_text("stage_result.json", exact=True).first.wait_for()     # the tree is there
    folder = page.get_by_text("report_html", exact=True)
    if folder.count():                                   # the report in a folder of its own
        folder.first.click()
    page.get_by_text("report.html", exact=True).first.wait_for()
    shot(page, "mlflow-3-artifacts")
    page.get_by_text("report.html", exact=True).first.click()
    report = page.frame_locator("iframe").first
    report.get_by_text("Fine-tuning report").first.wait_for()
    shot(page, "mlflow-4-report")


def test_the_generations_table_opens_in_the_mlflow_ui(stack, ui_run, page):
    mlflow = MlflowClient(stack.mlflow_url)
    exp = mlflow.get_experiment_by_name("finetune-pipeline")
    parent = mlflow.search_runs([exp.experiment_id],
                                f"tags.`prefect.flow_run_id` = '{ui_run['id']}'")[0]
    page.goto(f"{stack.mlflow_url}/#/experiments/{exp.experiment_id}/runs/"
              f"{parent.info.run_id}/artifacts/generations_table.json")
    close_assistant(page)
    for column in ("prompt", "reference", "before", "after"):    # shown as a table, by column
        page.get_by_text(column, exact=True).first.wait_for()
    shot(page, "mlflow-5-generations-table")


# ------------------------------------------------------------------------------------------------
# 3. The nightly schedule, and what happens when two nightly runs collide
# ------------------------------------------------------------------------------------------------
def test_nightly_deployment_shows_its_schedule(stack, deployments, page):
    page.goto(stack.prefect_url + "/")
    page.get_by_role("link", name="Deployments").first.click()
    page.get_by_role("link", name="nightly-retrain").first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/"))
    page.get_by_text(re.compile(r"At 02:00 AM", re.I)).first.wait_for()   # the schedule card
    shot(page, "prefect-4-nightly-schedule")
    # the card's menu -> Edit shows the cron expression and its time zone (the page header has
    # a menu too, whose Edit opens the deployment's edit page; the card's may render later)
    card = page.locator("div").filter(has_text=re.compile(r"^\s*At 02:00 AM", re.I)) \
        .filter(has=page.get_by_role("button", name="Open menu"))
    card.first.get_by_role("button", name="Open menu").click()
    page.locator("[role=menu]").get_by_text("Edit", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    assert "0 2 * * *" in [i.input_value() for i in dialog.locator("input").all()]
    tz = local_timezone()
    assert tz in dialog.inner_text() or tz.split("/")[-1] in dialog.inner_text()
    shot(page, "prefect-5-nightly-schedule-edit")
    dialog.get_by_role("button", name="Close").first.click()
    cron = deployments["nightly-retrain"]["schedules"][0]["schedule"]
    assert cron["cron"] == "0 2 * * *" and cron["timezone"] == local_timezone()
    assert deployments["nightly-retrain"]["global_concurrency_limit"]["limit"] == 1
    assert deployments["nightly-retrain"]["concurrency_options"]["collision_strategy"] == \
        "CANCEL_NEW"


def test_nightly_collision_cancels_the_new_run_and_the_gate_keeps_the_champion(
        stack, api, deployments, ui_run, page):
    dep = deployments["nightly-retrain"]["id"]
    runs = [api("POST", f"/deployments/{dep}/create_flow_run", json={}) for _ in range(2)]
    done = {r["id"]: api.wait(r["id"]) for r in runs}
    states = sorted(r["state_type"] for r in done.values())
    assert states == ["CANCELLED", "COMPLETED"], states
    cancelled = next(r for r in done.values() if r["state_type"] == "CANCELLED")
    assert "Deployment concurrency limit reached" in cancelled["state"]["message"]
    completed = next(r for r in done.values() if r["state_type"] == "COMPLETED")

    mlflow = MlflowClient(stack.mlflow_url)
    champion = mlflow.get_model_version_by_alias("plant-care-chat", "champion")
    # the UI run's model: its first version, crowned by that run; the nightly rebuilt the same
    # model (every stage a cache hit), so the gate has nothing to decide and keeps it
    assert str(champion.version) == "1"
    assert len(mlflow.search_model_versions("name = 'plant-care-chat'")) == 1
    arts = api("POST", "/artifacts/filter", json={"artifacts": {
        "key": {"any_": ["champion-gate"]}, "flow_run_id": {"any_": [completed["id"]]}}})
    assert len(arts) == 1 and "KEEP" in arts[0]["data"] and "Unchanged model" in arts[0]["data"]

    page.goto(stack.prefect_url + "/")
    page.get_by_role("link", name="Runs").first.click()
    page.get_by_role("link", name=completed["name"]).first.click()
    page.get_by_role("tab", name="Artifacts").first.click()
    page.get_by_text("champion-gate").first.click()              # the key's history ...
    page.get_by_role("link", name=re.compile(r"^[0-9a-f]{8}$")).first.click()  # ... this one
    page.get_by_text(re.compile(r"Champion gate: KEEP")).first.wait_for()
    assert "out-of-domain retention" in page.inner_text("body")
    shot(page, "prefect-6-nightly-gate-artifact")
