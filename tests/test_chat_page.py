"""The chat page at / in a real browser: Debian's chromium, driven by Playwright.

The page's streamed reply must equal the server's own non-streamed greedy reply to the same
conversation, which checks both what the page sends and how it assembles the stream.
"""

import shutil

import httpx
import pytest
from conftest import tiny_chat_lm
from live_server import LiveServer

from gptkit.serve import ServeConfig, create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "Debian's chromium is not installed (make test installs it as root)",
        allow_module_level=True,
    )

NAME = "tiny"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        yield browser
        browser.close()


# Counts the changes to assistant bubbles' text: more than one means the reply streamed in.
COUNT_UPDATES = """() => {
  window.updates = 0;
  const count = (records) => records.forEach((r) => {
    if (r.target.classList && r.target.classList.contains('assistant')) window.updates += 1;
  });
  const options = {childList: true, subtree: true, characterData: true};
  new MutationObserver(count).observe(document.getElementById('messages'), options);
}"""


def _reply_via_api(url: str, messages: list[dict], headers=None) -> str:
    body = {"model": NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def _say(page, text: str) -> str:
    """Type a message, press Enter, wait for the streamed reply to finish; its text."""
    n = page.locator(".assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".assistant").nth(n)
    reply.and_(page.locator("[data-done='1']")).wait_for(timeout=30_000)
    return reply.text_content()


def test_a_streamed_conversation_and_reset(lm, browser, tmp_path):
    with LiveServer(create_app(lm, NAME, ServeConfig())) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.locator("#model", has_text=NAME).wait_for(timeout=10_000)
        page.fill("#system", "Be brief.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.evaluate(COUNT_UPDATES)

        first = _say(page, "hello there")
        history = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"},
        ]
        assert first and first == _reply_via_api(url, history)
        assert page.evaluate("window.updates") > 1  # the bubble grew piece by piece

        second = _say(page, "how are you?")
        history += [
            {"role": "assistant", "content": first},
            {"role": "user", "content": "how are you?"},
        ]
        assert second == _reply_via_api(url, history)  # the page sent the whole conversation
        assert page.locator(".user").all_text_contents() == ["hello there", "how are you?"]
        assert page.locator(".assistant").count() == 2
        page.screenshot(path=tmp_path / "chat.png")  # to look at when the page changes

        page.click("#reset")
        assert page.locator(".user, .assistant").count() == 0
        assert page.input_value("#system") == "Be brief."  # the system prompt stays
        third = _say(page, "hello there")
        assert third == first  # a new conversation: the old turns are not sent
        assert page.text_content("#error") == ""


def test_api_key_and_errors_are_shown(lm, browser):
    with LiveServer(create_app(lm, NAME, ServeConfig(api_key="sesame"))) as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#error", has_text="API key").wait_for(timeout=10_000)
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.locator("#model", has_text=NAME).wait_for(timeout=10_000)
        assert page.text_content("#error") == ""
        page.fill("#temperature", "0")
        page.fill("#max-tokens", str(MAX_TOKENS))
        messages = [{"role": "user", "content": "hello"}]
        expected = _reply_via_api(url, messages, {"Authorization": "Bearer sesame"})
        assert _say(page, "hello") == expected

        page.fill("#temperature", "5")  # out of range: the API says so, the page shows it
        _say(page, "hello again")
        assert "temperature" in page.text_content("#error")
