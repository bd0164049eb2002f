"""Screenshot of the chat page holding a real conversation, for the README.

Starts a server on the embedded default model (SmolLM2-135M-Instruct) with the
HTTP port on, opens ``http://127.0.0.1:PORT/`` in Debian's headless Chromium
(``scripts/install_browser.sh``), asks a question and a follow-up, and saves the
page once both answers have streamed in:

    .venv/bin/python scripts/screenshot_chat.py [--out docs/chat-page.png]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

from llm_stream.runtime import tune_openmp

tune_openmp()  # as the server does, before torch loads

from playwright.async_api import Page, async_playwright  # noqa: E402

from llm_stream.app import LLMStreamServer  # noqa: E402
from llm_stream.settings import Settings  # noqa: E402

CHROMIUM = os.environ.get("LLM_STREAM_CHROMIUM", "/usr/bin/chromium")
QUESTIONS = (
    "Give me three short tips for writing readable Python code.",
    "Which one matters most, in one sentence?",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(message: str) -> None:
    sys.stderr.write(f"[screenshot] {message}\n")


async def ask(page: Page, question: str) -> None:
    answers = await page.locator(".msg.assistant").count()
    await page.fill("#prompt", question)
    await page.press("#prompt", "Enter")
    await page.wait_for_function(
        "n => { const a = document.querySelectorAll('.msg.assistant');"
        " return a.length > n && a[n].dataset.state !== 'waiting'"
        " && a[n].dataset.state !== 'streaming'; }",
        arg=answers,
        timeout=180_000,
    )
    state = await page.locator(".msg.assistant").nth(answers).get_attribute("data-state")
    meta = await page.locator(".msg.assistant .meta").nth(answers).text_content()
    say(f"answer {answers + 1}: {state}, {meta}")
    if state != "done":
        raise SystemExit(f"the answer ended as {state!r}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/chat-page.png"))
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        raise SystemExit(f"no Chromium at {CHROMIUM}: run bash scripts/install_browser.sh")

    http_port = free_port()
    settings = Settings(host="127.0.0.1", port=0, http_port=http_port, warmup_tokens=2)
    server = LLMStreamServer(settings)
    await server.start()
    try:
        assert server.ready is not None
        say("loading the embedded model")
        await server.ready
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"]
            )
            page = await browser.new_page(
                viewport={"width": 960, "height": 640}, device_scale_factor=1, color_scheme="light"
            )
            await page.goto(f"http://127.0.0.1:{http_port}/")
            await page.wait_for_function("() => document.querySelector('#model').value !== ''")
            await page.click("#settings summary")
            await page.fill("#temperature", "0")  # greedy: the same picture every run
            await page.fill("#max-tokens", str(args.max_tokens))
            await page.click("#settings summary")
            for question in QUESTIONS:
                await ask(page, question)
            # The whole conversation in one picture: a window as tall as the page (a
            # full-page screenshot would misplace the fixed header and composer).
            height = await page.evaluate("() => document.documentElement.scrollHeight")
            await page.set_viewport_size({"width": 960, "height": max(640, height)})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=args.out)
            await browser.close()
        say(f"wrote {args.out}")
    finally:
        await server.drain(grace_s=0)


if __name__ == "__main__":
    asyncio.run(main())
