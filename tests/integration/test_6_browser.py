"""The tracking UI in a real browser: headless Chromium logs in the way a person does (it
answers the server's basic-auth challenge), then shows the trained run and the registered
model holding the alias. Screenshots land in tests/artifacts/. The browser itself: browser.py."""

from __future__ import annotations

import pytest
from browser import ARTIFACTS, Browser, chromium_binary
from stack import Stack


@pytest.fixture
def browser_for(stack: Stack):
    binary = chromium_binary()
    opened: list[Browser] = []

    def start(who: str | None) -> Browser:
        credentials = stack.credentials(who) if who else None
        browser = Browser(binary, credentials)
        opened.append(browser)
        return browser

    yield start
    for browser in opened:
        browser.close()


def test_ui_shows_the_trained_run(stack: Stack, trained, admin_client, browser_for):
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    run = admin_client.get_run(run_id)
    browser = browser_for("admin")
    # The trainer prints the run's UI address; its #/experiments/... part is the page.
    browser.open(stack.mlflow_url + "/#" + trained["run"].split("#", 1)[1])
    text = browser.wait_for_text(run.info.run_name, "eval_accuracy", "Finished")
    browser.screenshot(ARTIFACTS / "ui-run.png")
    assert browser.auth_challenges == 1
    assert stack.env["MODEL_NAME"] in text  # the run links the version it registered


def test_ui_shows_the_registered_model_with_its_alias(stack: Stack, trained, browser_for):
    browser = browser_for("admin")
    browser.open(f"{stack.mlflow_url}/#/models/{stack.env['MODEL_NAME']}")
    text = browser.wait_for_text(stack.env["MODEL_NAME"], f"Version {trained['version']}",
                                 stack.env["MODEL_ALIAS"])
    browser.screenshot(ARTIFACTS / "ui-model.png")
    assert f"@ {stack.env['MODEL_ALIAS']}" in text  # the alias tag, not just the word


def test_ui_without_credentials_shows_nothing_of_the_model(stack: Stack, trained, browser_for):
    browser = browser_for(None)
    browser.open(f"{stack.mlflow_url}/#/models/{stack.env['MODEL_NAME']}")
    text = browser.wait_for_text("not authenticated")
    browser.screenshot(ARTIFACTS / "ui-anonymous.png")
    assert browser.auth_challenges == 1
    assert stack.env["MODEL_NAME"] not in text and "Version " not in text, text[:1000]
