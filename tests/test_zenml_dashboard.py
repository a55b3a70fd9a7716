"""The ZenML dashboard of the team's ZenML server (infra/team/), in Debian's chromium (headless, through
chromedriver): after one pipeline run through the stack, the run's DAG shows one branch per variant,
and the model version stands in stage `production`. Screenshots go to test-artifacts/zenml-dashboard/.

ZenML 0.98's open-source dashboard has no model pages (its Models page offers ZenML Pro and names the
CLI), so the model version is read in the same browser session from the server's API, which the
dashboard's login also authorizes.
"""

import json
import time

import pytest
from selenium.webdriver.common.by import By

from edgeopt.config import PROJECT_ROOT
from infra.team.stack import STACK, ZENML_USER
from tests._browser import chromium, shown
from tests.test_team_stack import Host, ZenMLApi, finish, team_config

pytestmark = pytest.mark.slow

SCREENSHOTS = PROJECT_ROOT / "test-artifacts" / "zenml-dashboard"
RUN = "team-dashboard"
BRANCHES = ("export_teacher_onnx", "export_student_onnx", "quantize_student_onnx_int8")


@pytest.fixture(scope="module")
def run(stack, tmp_path_factory):
    host = Host(stack, tmp_path_factory.mktemp("host"))
    finish(host.run(team_config(stack, "team-dashboard", host.deploy), RUN))
    return ZenMLApi(stack).run(RUN)


@pytest.fixture(scope="module")
def browser(stack, tmp_path_factory):
    # no WebGL: the login page's shader animation keeps software rendering busy, and a busy machine
    # then never finishes loading a page
    with chromium(tmp_path_factory.mktemp("chromium-profile"), "1800,1300",
                  ("--disable-3d-apis", "--disable-webgl")) as driver:
        driver.set_page_load_timeout(180)
        driver.get(f"{stack.zenml_url}/login")
        _shown(driver, ["Log in to your account"])
        driver.find_element(By.NAME, "username").send_keys(ZENML_USER)
        driver.find_element(By.NAME, "password").send_keys(stack.zenml_password)
        driver.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
        deadline = time.monotonic() + 120
        while "/login" in driver.current_url and time.monotonic() < deadline:
            time.sleep(1)
        assert "/login" not in driver.current_url, "the dashboard did not accept the login within 120 s"
        yield driver


def _shown(driver, expected: list, shot: str = "") -> str:
    return shown(driver, expected, SCREENSHOTS / shot if shot else None)


def test_the_run_list_shows_the_run_on_the_team_stack(stack, run, browser):
    browser.get(f"{stack.zenml_url}/projects/default/runs")
    _shown(browser, [RUN, "compress", STACK], "runs.png")


def test_the_run_dag_has_one_branch_per_variant(stack, run, browser):
    browser.get(f"{stack.zenml_url}/projects/default/runs/{run['id']}")
    steps = ["load_data", "train_teacher", "distill_student", *BRANCHES, "evaluate", "select", "promote", "deploy"]
    _shown(browser, steps, "run-dag.png")
    # the drawn edges, step to step through their artifacts ("Edge from <step>/outputs/... to step/<step>")
    drawn = set()
    for edge in browser.find_elements(By.CSS_SELECTOR, ".react-flow__edge"):
        source, target = edge.get_attribute("aria-label").removeprefix("Edge from ").split(" to ")
        if target.startswith("step/"):
            drawn.add((source.split("/")[0], target.removeprefix("step/")))
    # each variant is a chain of its own from its base to evaluate
    branches = {("train_teacher", "export_teacher_onnx"), ("export_teacher_onnx", "evaluate"),
                ("distill_student", "export_student_onnx"), ("export_student_onnx", "evaluate"),
                ("export_student_onnx", "quantize_student_onnx_int8"), ("quantize_student_onnx_int8", "evaluate")}
    assert branches <= drawn, sorted(drawn)
    assert not any(a in BRANCHES and b in BRANCHES and (a, b) not in branches for a, b in drawn), sorted(drawn)


def test_the_model_version_is_in_production(stack, run, browser):
    browser.get(f"{stack.zenml_url}/projects/default/models")
    _shown(browser, ["zenml model list"], "models-page.png")  # the open-source dashboard names the CLI
    browser.get(f"{stack.zenml_url}/api/v1/model_versions?model=team-dashboard&hydrate=true")
    _shown(browser, ['"production"'], "model-version.png")
    versions = json.loads(browser.find_element(By.TAG_NAME, "pre").text)["items"]
    assert [(v["body"]["model"]["name"], v["body"]["stage"]) for v in versions] == [("team-dashboard", "production")]
