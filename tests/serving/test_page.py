"""The chat page in a real headless Chromium (Debian's), driven by playwright against the live server."""

from __future__ import annotations

import shutil

import pytest

from .test_api import QUESTION, client

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COUNT_UPDATES = """() => {
  window.updates = 0;
  new MutationObserver(() => { window.updates += 1; })
    .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def api_answer(server, messages):
    return client(server).chat.completions.create(model="tiny3", messages=messages, temperature=0,
                                                  max_tokens=16).choices[0].message.content


@pytest.fixture
def page(served):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(served.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny3'")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "16")
        yield page
        browser.close()


def ask(page, text: str, turn: int) -> str:
    page.fill("#input", text)
    page.click("#send")
    answer = page.locator(".message.assistant").nth(turn)
    answer.wait_for()
    page.wait_for_function(f"document.querySelectorAll('.message.assistant')[{turn}].dataset.state === 'done'")
    return answer.text_content()


def test_a_message_gets_a_streamed_answer_and_history_is_kept(page, served):
    page.evaluate(COUNT_UPDATES)
    first = ask(page, QUESTION, 0)
    assert first == api_answer(served, [{"role": "user", "content": QUESTION}])
    assert page.evaluate("window.updates") > 3, "the answer appeared at once, not token by token"
    second = ask(page, "你好", 1)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
               {"role": "user", "content": "你好"}]
    assert second == api_answer(served, history)
    assert page.locator(".message.user").count() == 2


def test_clear_empties_the_conversation(page, served):
    ask(page, QUESTION, 0)
    page.click("#clear")
    assert page.locator(".message").count() == 0
    fresh = ask(page, "你好", 0)
    assert fresh == api_answer(served, [{"role": "user", "content": "你好"}])


def test_stop_ends_a_long_answer(page, served):
    page.fill("#max-tokens", "3000")
    page.fill("#input", QUESTION)
    page.click("#send")
    page.wait_for_function("document.querySelector('.message.assistant').textContent.length > 5")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.message.assistant').dataset.state === 'stopped'")
    assert page.is_enabled("#send")
