"""Single sign-on (AUTH_MODE=oidc) as a team uses it: people log in through an OpenID
Provider in a real browser and see what their group may see; API clients use access tokens;
the trainer and serving keep working as service accounts.

The identity provider is a TEST one (tests/oidc-provider/: the certified oidc-provider library
with fixed test users). This module runs its own compose project, with compose.oidc.yaml and
the provider's test override on top of the usual files. Screenshots land in tests/artifacts/.
"""

from __future__ import annotations

import json
import secrets
import uuid

import pytest
import requests
from browser import ARTIFACTS, Browser, chromium_binary
from stack import ROOT, TEST_IMAGES, TRAIN_IMAGES, Stack, free_port, poll, write_env

IDP_HOST = "oidc.test"
ADMIN_GROUP, READER_GROUP = "mlflow-admins", "mlflow-readers"
RESTRICTED_EXPERIMENT = "sso-restricted"


def idp_user(login: str, groups: list[str]) -> dict:
    return {"login": login, "password": secrets.token_urlsafe(16), "email": f"{login}@example.test",
            "name": login.capitalize(), "groups": groups}


USERS = {"alice": idp_user("alice", [ADMIN_GROUP]), "bob": idp_user("bob", [READER_GROUP]),
         "carol": idp_user("carol", ["sales"])}


@pytest.fixture(scope="module")
def sso(images, tmp_path_factory, request) -> Stack:
    offline = images
    project = f"mlopssso{uuid.uuid4().hex[:8]}"
    mlflow_port, idp_port = free_port(), free_port()
    env_file = tmp_path_factory.mktemp("sso") / ".env"
    env = write_env(env_file, offline, {
        "COMPOSE_PROJECT_NAME": project,
        "MLFLOW_PORT": str(mlflow_port),
        "SERVING_PORT": str(free_port()),
        "ALIAS_POLL_SECONDS": "1",
        "AUTH_MODE": "oidc",
        "OIDC_DISCOVERY_URL": f"http://{IDP_HOST}:{idp_port}/.well-known/openid-configuration",
        "OIDC_CLIENT_ID": "mlflow",
        "OIDC_CLIENT_SECRET": secrets.token_urlsafe(24),
        "OIDC_REDIRECT_URI": f"http://127.0.0.1:{mlflow_port}/callback",
        "OIDC_TEST_PORT": str(idp_port),
        # Single quotes: compose reads the JSON literally.
        "OIDC_TEST_USERS": "'" + json.dumps(list(USERS.values()), separators=(",", ":")) + "'",
        "OIDC_TEST_BASE_IMAGE": "mlops-local/debian:trixie" if offline else "debian:trixie-slim",
    })
    stack = Stack(project=project, env_file=env_file, offline=offline, env=env,
                  extra_files=(ROOT / "compose.oidc.yaml", ROOT / "tests/oidc-provider/compose.yaml"))
    stack.compose("--profile", "train", "build", timeout=3600)
    failed = True
    try:
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300")
        failed = False
        yield stack
    finally:
        if failed or request.session.testsfailed:
            logs = stack.compose("--profile", "train", "logs", "--no-color", check=False).stdout
            (ARTIFACTS / "sso-compose-logs.txt").parent.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "sso-compose-logs.txt").write_text(logs)
        stack.compose("--profile", "train", "down", "--volumes", "--remove-orphans", check=False)


@pytest.fixture
def browser_for(sso: Stack):
    binary = chromium_binary()
    opened: list[Browser] = []

    def start() -> Browser:
        # The issuer's name resolves to the published loopback port, as it does for people
        # whose provider is on the network: the browser and the server use the same URL.
        browser = Browser(binary, None, extra_args=(f"--host-resolver-rules=MAP {IDP_HOST} 127.0.0.1",))
        opened.append(browser)
        return browser

    yield start
    for browser in opened:
        browser.close()


def current_user_status(browser: Browser) -> int:
    return browser.evaluate("fetch('/api/2.0/mlflow/users/current').then(r => r.status)", await_promise=True)


def log_in(browser: Browser, stack: Stack, login: str, password: str, shot: str) -> None:
    """What a person does: open MLflow's login, land on the provider's form, sign in."""
    browser.open(f"{stack.mlflow_url}/login")
    poll("the identity provider's login form",
         lambda: browser.url().startswith(f"http://{IDP_HOST}:") and browser.evaluate(
             "!!document.querySelector('input[name=password]')"), timeout=60)
    browser.screenshot(ARTIFACTS / f"sso-{shot}-provider-form.png")
    browser.evaluate(f"""(() => {{
        document.querySelector('input[name=login]').value = {json.dumps(login)};
        document.querySelector('input[name=password]').value = {json.dumps(password)};
        document.querySelector('form').submit();
        return true; }})()""")


def logged_in(browser: Browser, stack: Stack) -> bool:
    return browser.url().startswith(stack.mlflow_url) and current_user_status(browser) == 200


@pytest.fixture(scope="module")
def admin_token(sso: Stack) -> tuple[str, str]:
    """An administrator logs in and creates an access token for scripts, as the plugin's UI
    does; then makes an experiment that the readers' group has no grant on."""
    browser = Browser(chromium_binary(), None, extra_args=(f"--host-resolver-rules=MAP {IDP_HOST} 127.0.0.1",))
    try:
        log_in(browser, sso, "alice", USERS["alice"]["password"], "admin")
        poll("the administrator's session", lambda: logged_in(browser, sso), timeout=60)
        reply = browser.evaluate("""fetch('/api/2.0/mlflow/users/access-token', {method: 'PATCH',
            headers: {'Content-Type': 'application/json'}, body: '{}'})
            .then(async r => ({status: r.status, body: await r.text()}))""", await_promise=True)
    finally:
        browser.close()
    assert reply["status"] == 200, reply
    credentials = (USERS["alice"]["email"], json.loads(reply["body"])["token"])
    response = requests.post(f"{sso.mlflow_url}/api/2.0/mlflow/experiments/create",
                             json={"name": RESTRICTED_EXPERIMENT}, auth=credentials, timeout=30)
    assert response.status_code == 200, response.text
    return credentials


def test_reader_logs_in_and_sees_only_what_the_group_may_see(sso: Stack, admin_token, browser_for):
    browser = browser_for()
    log_in(browser, sso, "bob", USERS["bob"]["password"], "reader")
    poll("the reader's session", lambda: logged_in(browser, sso), timeout=60)
    browser.open(f"{sso.mlflow_url}/#/experiments")
    text = browser.wait_for_text(sso.env["EXPERIMENT_NAME"])
    browser.screenshot(ARTIFACTS / "sso-reader-experiments.png")
    assert RESTRICTED_EXPERIMENT not in text, text[:2000]


def test_wrong_password_is_refused_at_the_provider(sso: Stack, browser_for):
    browser = browser_for()
    log_in(browser, sso, "bob", "not-" + USERS["bob"]["password"], "wrong-password")
    text = poll("the provider's refusal", lambda: "wrong password" in browser.text() and browser.text(), timeout=30)
    browser.screenshot(ARTIFACTS / "sso-wrong-password.png")
    assert browser.url().startswith(f"http://{IDP_HOST}:"), text


def test_user_outside_the_allowed_groups_gets_no_session(sso: Stack, browser_for):
    browser = browser_for()
    log_in(browser, sso, "carol", USERS["carol"]["password"], "outsider")
    poll("the return to the tracking server", lambda: browser.url().startswith(sso.mlflow_url), timeout=60)
    browser.screenshot(ARTIFACTS / "sso-outsider.png")
    assert current_user_status(browser) == 401


def test_api_call_with_a_token_works_and_without_one_is_refused(sso: Stack, admin_token):
    url = f"{sso.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=100"
    with_token = requests.get(url, auth=admin_token, timeout=30)
    assert with_token.status_code == 200, with_token.text
    names = {e["name"] for e in with_token.json()["experiments"]}
    assert {sso.env["EXPERIMENT_NAME"], RESTRICTED_EXPERIMENT} <= names
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, auth=(admin_token[0], "mlf_not_a_token"), timeout=30).status_code == 401


def test_trainer_and_serving_service_accounts_train_register_and_serve(sso: Stack):
    sso.compose("run", "--rm", "-T", "--entrypoint", "python", "trainer", "-m", "trainer.synthetic",
                "--data-dir", "/data", "--train", str(TRAIN_IMAGES), "--test", str(TEST_IMAGES))
    trained = sso.train("--epochs", "1", "--batch-size", "32")
    assert trained["version"] == "1" and trained["promoted"].startswith("yes")
    sso.wait_served_version(trained["version"], timeout=180)
    # Each serving worker follows the alias on its own: poll until any of them answers.
    response = poll("a prediction from serving", lambda: (r := requests.post(
        f"{sso.serving_url}/invocations", json={"inputs": [[[[0.0] * 28] * 28]]}, timeout=60)).ok and r, timeout=120)
    assert response.headers["X-Model-Version"] == trained["version"]
    assert len(response.json()["predictions"][0]) == 10


PROBE = """
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

client = MlflowClient()
restricted, model = sys.argv[1:3]
try:
    print("visible" if client.get_experiment_by_name(restricted) else "hidden")
except MlflowException:
    print("hidden")
try:
    client.set_registered_model_tag(model, "probe", "x")
    print("tagged")
except MlflowException as error:
    print("refused", error.error_code)
"""


def test_service_accounts_keep_least_privilege(sso: Stack, admin_token):
    """Neither may see an experiment nobody granted it; serving may not change its model."""
    args = ["-T", "--entrypoint", "python"]
    model = sso.env["MODEL_NAME"]
    trainer = sso.compose("run", "--rm", *args, "trainer", "-c", PROBE, RESTRICTED_EXPERIMENT, model).stdout.split()
    serving = sso.compose("run", "--rm", "--no-deps", *args, "serving", "-c", PROBE, RESTRICTED_EXPERIMENT,
                          model).stdout.split()
    assert trainer == ["hidden", "tagged"]
    assert serving[:2] == ["hidden", "refused"], serving
