"""The chat page in headless Chromium (Debian's chromium, driven by Playwright): it lists the models,
streams a reply to a typed message, and shows tokens/s."""

from __future__ import annotations

import os
import shutil

import pytest

from server_helpers import ServerProcess, chat_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_typing_a_message_streams_a_reply(browser, tmp_path):
    with ServerProcess(f"alpha={chat_model(0)}", f"beta={chat_model(1)}", log=tmp_path / "server.log") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length == 2")
        assert page.locator("#model option").all_inner_texts() == ["alpha (unloaded)", "beta (unloaded)"]
        page.select_option("#model", "beta")
        page.fill("#max-tokens", "24")
        page.fill("#temperature", "0")
        page.fill("#prompt", "Hello, who are you?")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.user")
        page.wait_for_function("document.querySelector('#stats').textContent.includes('first token after')",
                               timeout=60_000)
        assert page.locator(".msg.user").inner_text() == "Hello, who are you?"
        reply = page.locator(".msg.assistant").inner_text()
        assert reply.strip(), "the reply is empty"
        stats = page.locator("#stats").inner_text()
        assert "tok/s" in stats and "tokens" in stats
        assert page.locator(".msg.error").count() == 0
        assert server.model("beta")["state"] == "loaded" and server.model("alpha")["state"] == "unloaded"
        page.wait_for_function("document.querySelector('#model').selectedOptions[0].textContent == 'beta (loaded)'")
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.close()


def test_the_page_asks_for_the_key_once_and_keeps_it_for_the_session(browser, tmp_path):
    key = "sk-web-page-key"
    with ServerProcess(f"alpha={chat_model(0)}", "--api-key", key, log=tmp_path / "server.log") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.locator("#model option").count() == 0  # nothing is listed without the key
        page.fill("#api-key", "sk-wrong")
        page.click("#use-key")
        page.wait_for_function("document.querySelector('#key-error').textContent.includes('refused')")
        assert not page.locator("#key-form").is_hidden()
        page.fill("#api-key", key)
        page.click("#use-key")
        page.wait_for_function("document.querySelectorAll('#model option').length == 1")
        assert page.locator("#key-form").is_hidden()
        page.fill("#max-tokens", "8")
        page.fill("#temperature", "0")
        page.fill("#prompt", "Hello")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#stats').textContent.includes('first token after')",
                               timeout=60_000)
        assert page.locator(".msg.assistant").inner_text().strip() and page.locator(".msg.error").count() == 0
        assert page.evaluate("sessionStorage.getItem('pipeload-api-key')") == key
        page.reload()  # the same tab keeps the key: no second question
        page.wait_for_function("document.querySelectorAll('#model option').length == 1")
        assert page.locator("#key-form").is_hidden()
        page.close()
