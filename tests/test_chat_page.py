"""The chat page (``GET /`` on the HTTP port) in a real headless Chromium.

Debian's ``chromium`` (``scripts/install_browser.sh``) driven by playwright, against a
real server on the tiny model, slowed so that answers visibly stream and Stop lands
mid-answer. Only the markdown-injection check fakes the model's answer (with
``page.route``): the tiny model cannot be made to write HTML on purpose.
Each test leaves a screenshot of the page in its pytest tmp folder, failing ones too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llm_stream.engine.types import FinishReason
from tests.conftest import RunningServer, free_port, running_server, tiny_settings
from tests.wrapped_backend import slow_models

if TYPE_CHECKING:
    from playwright.async_api import Browser, ConsoleMessage, Page, Request, Route

CHROMIUM = Path(os.environ.get("LLM_STREAM_CHROMIUM", "/usr/bin/chromium"))
SETUP_HINT = (
    "the chat-page test needs Chromium at {path} (Debian's chromium package, or set "
    "LLM_STREAM_CHROMIUM) and the playwright package: run `bash scripts/install_browser.sh` "
    "and `bash scripts/setup.sh` (scripts/test.sh runs both)"
)
STEP_DELAY_S = 0.03  # per decode step: 40 tokens take over a second, so streaming is visible
CHAT_PATH = "/v1/chat/completions"
ENDED = ("done", "stopped", "error")

# The state and rendered text of the last answer on the page.
LAST_ANSWER = """() => {
  const answers = document.querySelectorAll('.msg.assistant');
  const last = answers[answers.length - 1];
  return last ? [last.dataset.state, last.querySelector('.content').textContent] : [null, ''];
}"""


@pytest.fixture(scope="module")
async def chat_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port(), max_concurrent=4)
    async with running_server(settings, load_models=slow_models(STEP_DELAY_S)) as running:
        yield running


def chromium_installed() -> bool:
    return CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not chromium_installed():
        pytest.fail(SETUP_HINT.format(path=CHROMIUM))
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(SETUP_HINT.format(path=CHROMIUM))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()


def page_url(running: RunningServer) -> str:
    return f"http://127.0.0.1:{running.server.http_port}/"


@contextlib.asynccontextmanager
async def open_page(browser: Browser, url: str, screenshot: Path) -> AsyncIterator[Page]:
    """A fresh browser context on ``url``; a screenshot at the end, however the test
    ends. Fails the test on a script error or a CSP violation; failed loads (4xx on
    purpose) are the test's affair."""
    context = await browser.new_context(viewport={"width": 1000, "height": 760})
    page = await context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console error: {message.text}")

    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", on_console)
    try:
        await page.goto(url)
        try:
            yield page
        finally:
            await page.screenshot(path=screenshot, full_page=True)
    finally:
        await context.close()
    assert problems == []


async def models_listed(page: Page) -> list[str]:
    await page.wait_for_function("() => document.querySelector('#model').value !== ''")
    return await page.locator("#model option").evaluate_all("os => os.map(o => o.value)")


@pytest.fixture
async def page(browser: Browser, chat_server: RunningServer, tmp_path: Path) -> AsyncIterator[Page]:
    """The chat page on the slowed tiny model, with the model list filled."""
    async with open_page(browser, page_url(chat_server), tmp_path / "chat.png") as page:
        assert await models_listed(page) == ["tiny"]
        yield page


def chat_requests(page: Page) -> list[dict[str, Any]]:
    """The JSON bodies of the page's chat requests, collected as they are sent."""
    bodies: list[dict[str, Any]] = []

    def on_request(request: Request) -> None:
        if request.url.endswith(CHAT_PATH) and request.method == "POST":
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", on_request)
    return bodies


async def change_settings(page: Page, max_tokens: int, temperature: float | None = None) -> None:
    """As a user would: open Settings, type the numbers, close Settings."""
    await page.click("#settings summary")
    await page.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        await page.fill("#temperature", str(temperature))
    await page.click("#settings summary")


async def ask(page: Page, question: str) -> None:
    await page.fill("#prompt", question)
    await page.press("#prompt", "Enter")


async def watch_answer(page: Page, timeout_s: float = 60) -> tuple[str, list[str], str]:
    """Polls the last answer until it ends: (final state, texts seen while streaming, text)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, text = await page.evaluate(LAST_ANSWER)
        if state in ENDED:
            return state, seen, text
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        await asyncio.sleep(0.01)
    raise AssertionError(f"the answer did not finish within {timeout_s} s; seen {seen[-1:]}")


async def test_page_and_assets_are_served_from_the_package(
    page: Page, chat_server: RunningServer
) -> None:
    response = await page.request.get(page_url(chat_server))
    assert response.ok
    assert response.headers["content-type"].startswith("text/html")
    assert_page_headers(response.headers)
    html = await response.text()
    # No inline script (the CSP would refuse it anyway): every script is a file.
    scripts = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    assert scripts
    assert all(re.search(r"\ssrc=", tag) for tag in scripts), scripts
    for asset, kind in [("static/chat.js", "javascript"), ("static/chat.css", "text/css")]:
        response = await page.request.get(page_url(chat_server) + asset)
        assert response.ok, asset
        assert kind in response.headers["content-type"], asset
        assert_page_headers(response.headers)
    assert await page.title() == "llm-stream chat"


def assert_page_headers(headers: dict[str, str]) -> None:
    """The policy comes as headers: a <meta> policy cannot keep the page out of frames."""
    policy = headers["content-security-policy"]
    for directive in ("script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy, policy
    assert "unsafe-inline" not in policy
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


async def test_model_list_is_fetched_again_after_a_503(page: Page) -> None:
    """While the server warms up GET /v1/models is a 503: the page tries again after
    its Retry-After until the list comes."""
    refused: list[str] = []

    async def warming_up(route: Route) -> None:
        if refused:
            await route.continue_()
            return
        refused.append(route.request.url)
        await route.fulfill(
            status=503,
            headers={"content-type": "application/json", "retry-after": "1"},
            body=json.dumps({"error": {"message": "warming up", "type": "server_error"}}),
        )

    await page.route("**/v1/models", warming_up)
    await page.reload()
    status = page.locator("#status")
    await status.wait_for()
    text = await status.text_content() or ""
    assert text.startswith("Could not list the models: 503"), text
    assert "trying again in 1 s" in text, text
    assert await models_listed(page) == ["tiny"]
    await status.wait_for(state="hidden")
    assert len(refused) == 1


async def test_answer_streams_and_follow_up_sends_the_history(
    page: Page, chat_server: RunningServer
) -> None:
    sent = chat_requests(page)
    await change_settings(page, max_tokens=40, temperature=0)  # greedy: reproducible

    await ask(page, "Hello there, who are you?")
    state, seen, first_text = await watch_answer(page)
    assert state == "done"
    # The text grew on the page in several steps before the answer completed.
    assert len(seen) >= 2, seen
    assert len(seen[0]) < len(first_text)
    meta = await page.text_content(".msg.assistant .meta") or ""
    assert "TTFT" in meta, meta
    assert "tokens/s" in meta, meta
    assert "40 tokens" in meta, meta  # stream_options.include_usage: the server's count
    assert sent[0]["stream"] is True
    assert sent[0]["model"] == "tiny"
    assert sent[0]["max_tokens"] == 40
    assert sent[0]["temperature"] == 0
    assert sent[0]["messages"] == [{"role": "user", "content": "Hello there, who are you?"}]
    # The answer the server gives that greedy request (Chromium keeps no copy of a
    # streamed fetch body), asked again without streaming.
    replay = await page.request.post(
        page_url(chat_server) + CHAT_PATH[1:], data={**sent[0], "stream": False}
    )
    assert replay.ok, await replay.text()
    answer = (await replay.json())["choices"][0]["message"]["content"]
    assert answer

    await ask(page, "Tell me more.")
    state, _, _ = await watch_answer(page)
    assert state == "done"
    assert len(sent) == 2
    # The follow-up carried the whole conversation: the first question, the answer
    # exactly as the server generated it, then the new question.
    assert sent[1]["messages"] == [
        {"role": "user", "content": "Hello there, who are you?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Tell me more."},
    ]
    assert await page.locator(".msg.user").count() == 2
    assert await page.locator(".msg.assistant[data-state=done]").count() == 2


async def test_stop_cancels_the_generation_on_the_server(
    page: Page, chat_server: RunningServer
) -> None:
    # Greedy, the tiny model's answer runs to max_tokens: 3000 tokens take about 90 s
    # at this pace, so it is still streaming when Stop is pressed.
    max_tokens = 3000
    await change_settings(page, max_tokens=max_tokens, temperature=0)
    await ask(page, "Write a very long story.")
    await page.wait_for_function(
        "() => document.querySelector('.msg.assistant')?.dataset.state === 'streaming'"
        " && document.querySelector('.msg.assistant .content').textContent.length > 5"
    )
    assert await page.is_visible("#stop")
    assert not await page.is_visible("#send")
    # The page keeps the id the server gave the generation (x-request-id, also in
    # the chunks' "chatcmpl-<id>").
    answer = page.locator(".msg.assistant")
    request_id = await answer.get_attribute("data-request-id")
    assert request_id
    assert await answer.get_attribute("data-id") == f"chatcmpl-{request_id}"
    await page.click("#stop")

    # The server cancelled that generation: the model stopped within one step of
    # noticing the closed stream, long before max_tokens.
    record = await chat_server.server.engine.wait_finished(request_id, timeout=10)
    assert record.finish_reason is FinishReason.CANCELLED
    assert 0 < record.completion_tokens < max_tokens
    assert record.steps_after_cancel is not None
    assert record.steps_after_cancel <= 1

    state, _, text = await watch_answer(page, timeout_s=10)
    assert state == "stopped"
    assert text  # what had arrived stays on the page
    assert "stopped" in (await page.text_content(".msg.assistant .meta") or "")
    assert await page.is_visible("#send")


async def test_server_errors_are_shown_readably(page: Page) -> None:
    # Above the server's --max-tokens-cap, which the form has not learnt (as from a
    # server older than max_tokens_cap in /v1/models): the server's 400 is shown.
    await page.evaluate("() => document.querySelector('#max-tokens').removeAttribute('max')")
    await change_settings(page, max_tokens=100000)
    await ask(page, "Hello")
    state, _, _ = await watch_answer(page)
    assert state == "error"
    error = await page.text_content(".msg.assistant .error") or ""
    assert error.startswith("400"), error
    assert "max_tokens" in error, error  # the message from the OpenAI-shaped error body
    assert "{" not in error, error


HOSTILE_ANSWER = """Here is **bold**, *italic*, `<b>code</b>` and a [link](https://example.com/docs).
<img src=x onerror="window.injected = 'img'"> and <script>window.injected = 'script'</script>
[click me](javascript:window.injected='link') <a href="https://evil.example">a tag</a>

- one
- two <iframe src="https://evil.example"></iframe>

```html
<svg onload="window.injected = 'svg'"></svg>
```
"""


def fake_stream(text: str, piece: int = 9) -> str:
    events = [
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text[i : i + piece]}}],
        }
        for i in range(0, len(text), piece)
    ]
    events.append(
        {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )  # fmt: skip
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


async def test_markdown_from_the_model_cannot_inject_html(page: Page) -> None:
    async def answer_with_html(route: Route) -> None:
        await route.fulfill(
            status=200,
            headers={"content-type": "text/event-stream"},
            body=fake_stream(HOSTILE_ANSWER),
        )

    await page.route("**" + CHAT_PATH, answer_with_html)
    await ask(page, "Say something dangerous.")
    state, _, text = await watch_answer(page)
    assert state == "done"
    answer = page.locator(".msg.assistant .content")
    # The markup arrived as text and is shown as text: no element was made from it.
    for tag in ("img", "script", "iframe", "svg"):
        assert await answer.locator(tag).count() == 0, tag
    for shown in ('<img src=x onerror="window.injected', "<script>window.injected", "<iframe"):
        assert shown in text, shown
    assert await page.evaluate("() => window.injected") is None
    # Markdown itself is rendered; only http(s) links become links.
    assert await answer.locator("strong").text_content() == "bold"
    assert await answer.locator("em").text_content() == "italic"
    assert await answer.locator("p code").text_content() == "<b>code</b>"
    assert await answer.locator("li").count() == 2
    assert "<svg onload" in (await answer.locator("pre code").text_content() or "")
    links = await answer.locator("a").evaluate_all(
        "links => links.map(a => [a.textContent, a.href, a.rel, a.target])"
    )
    assert ["link", "https://example.com/docs", "noopener noreferrer nofollow", "_blank"] in links
    # javascript: never becomes a link; a bare https URL (inside the hostile <a>) may.
    assert all(href.startswith("https://") for _, href, _, _ in links), links
    assert "[click me](javascript:window.injected='link')" in text
    assert '<a href="' in text


async def test_api_key_from_the_settings_is_sent(
    browser: Browser, tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("page-key-123\n")
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port(), api_keys_file=keys)
    async with (
        running_server(settings) as running,
        open_page(browser, page_url(running), tmp_path / "chat.png") as page,
    ):
        # Without a key the page says why it has no models, and opens the settings.
        status = page.locator("#status")
        await status.wait_for()
        assert (await status.text_content() or "").startswith("Could not list the models: 401")
        assert await page.locator("#settings").get_attribute("open") is not None
        await page.fill("#api-key", "page-key-123")
        await page.press("#api-key", "Tab")  # change: the models are fetched again
        assert await models_listed(page) == ["tiny"]
        assert not await status.is_visible()
        # Greedy: sampled at the model's temperature, the tiny model's answer was now
        # and then only an end of sequence or blanks, an empty answer (a flaky test).
        await page.fill("#temperature", "0")
        await page.click("#settings summary")
        sent = chat_requests(page)
        headers: list[str | None] = []
        page.on("request", lambda r: headers.append(r.headers.get("authorization")))
        await ask(page, "Hello")
        state, _, text = await watch_answer(page)
        assert state == "done"
        assert text
        assert len(sent) == 1
        assert "max_tokens" not in sent[0]  # by default the server's --default-max-tokens
        assert "Bearer page-key-123" in headers
        # The key is remembered by this browser, for the next visit.
        assert await page.evaluate("() => localStorage.getItem('llm-stream.chat.apiKey')") == (
            "page-key-123"
        )


async def test_an_answer_is_read_to_its_end_not_cancelled(page: Page) -> None:
    """The page reads the stream to its end after [DONE]: cancelling the reader there
    showed every successful answer as a failed request (net::ERR_ABORTED)."""
    failed: list[str] = []
    finished: list[str] = []
    page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
    page.on("requestfinished", lambda r: finished.append(r.url))
    await change_settings(page, max_tokens=8, temperature=0)
    await ask(page, "Hello")
    state, _, _ = await watch_answer(page)
    assert state == "done"
    await page.wait_for_timeout(300)  # a failure event comes after the page is done
    assert failed == []
    assert any(url.endswith(CHAT_PATH) for url in finished)


async def test_settings_values_are_drawn_as_text_not_as_placeholders(page: Page) -> None:
    await page.click("#settings summary")
    colors = await page.evaluate(
        """() => {
          const color = (el) => getComputedStyle(el).color;
          const probe = document.querySelector('#temperature');
          return {
            text: color(document.body),
            temperature: color(probe),
            maxTokens: color(document.querySelector('#max-tokens')),
            label: color(probe.closest('label')),
          };
        }"""
    )
    assert colors["temperature"] == colors["text"] == colors["maxTokens"], colors
    assert colors["label"] != colors["text"]  # labels stay muted; their values do not


async def test_the_conversation_survives_a_reload_until_new_chat(page: Page) -> None:
    sent = chat_requests(page)
    await change_settings(page, max_tokens=6, temperature=0)
    await ask(page, "Remember me")
    state, _, text = await watch_answer(page)
    assert state == "done"
    await page.reload()
    assert await models_listed(page) == ["tiny"]
    assert await page.locator(".msg.user").all_text_contents() == ["Remember me"]
    restored = await page.locator(".msg.assistant .content").all_text_contents()
    assert restored == [text]
    sent = chat_requests(page)  # the reloaded page's requests
    await ask(page, "And now?")
    state, _, _ = await watch_answer(page)
    assert state == "done"
    assert [m["role"] for m in sent[0]["messages"]] == ["user", "assistant", "user"]
    assert sent[0]["messages"][0]["content"] == "Remember me"
    await page.click("#new-chat")
    assert await page.locator(".msg").count() == 0
    await page.reload()
    assert await models_listed(page) == ["tiny"]
    assert await page.locator(".msg").count() == 0
    assert await page.is_visible("#empty")


async def test_max_tokens_above_the_servers_cap_is_caught_by_the_form(page: Page) -> None:
    # The cap comes from the server (--max-tokens-cap, 4000 in these tests).
    assert await page.get_attribute("#max-tokens", "max") == "4000"
    sent = chat_requests(page)
    await change_settings(page, max_tokens=5000)
    await ask(page, "Too long")
    await page.wait_for_timeout(200)
    assert sent == []
    assert await page.locator("#settings").get_attribute("open") is not None
    assert await page.evaluate("() => document.querySelector('#max-tokens').validity.rangeOverflow")
    assert await page.input_value("#prompt") == "Too long"  # nothing of it was lost
