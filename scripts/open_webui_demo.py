"""Open WebUI, with its default settings, chatting with llm-stream in headless Chromium.

Issue 13: Open WebUI's default chat attaches its built-in tools to every request;
the server answers them as text (the ``x-llm-stream-tools`` response header and a
"tools left out of the prompt" log line say so) instead of refusing with a 400.
This script opens Open WebUI, sends one message, waits until the streamed answer
is complete, checks for an error bubble and saves a screenshot. With
``--record-port`` it also runs a small recording proxy in front of llm-stream and
logs, for every request Open WebUI sent (the chat and its background tasks: title,
follow-ups, tags), whether it streamed, how many tools it carried, the status and
the ``x-llm-stream-tools`` header. Not run in CI: Open WebUI's install is large.

Setup, done once (Open WebUI in its own venv, outside the repository; pin the
CPU build of torch first, or pip pulls GBs of CUDA wheels):

    python3.11 -m venv /work/owui-venv
    /work/owui-venv/bin/pip install torch==2.13.0    # a CPU build on PyPI here
    /work/owui-venv/bin/pip install open-webui==0.12.4
    apt-get install -y chromium                        # scripts/install_browser.sh

1. llm-stream on the default model (embedded SmolLM2-135M-Instruct), HTTP API on 18652:

    .venv/bin/python -m llm_stream.serve --host 127.0.0.1 --port 18651 \\
        --http-port 18652 --log-level INFO

2. Open WebUI with its default settings, except what points it at llm-stream
   (through this script's recording proxy on 18653; use 18652 to skip the proxy)
   and keeps it off the network and without an account:

    mkdir -p /tmp/owui-data && cd /tmp/owui-data && \\
    DATA_DIR=/tmp/owui-data \\
    OPENAI_API_BASE_URL=http://127.0.0.1:18653/v1 OPENAI_API_KEY=none \\
    ENABLE_OLLAMA_API=False WEBUI_AUTH=False OFFLINE_MODE=True HF_HUB_OFFLINE=1 \\
    /work/owui-venv/bin/open-webui serve --host 127.0.0.1 --port 18680

   DATA_DIR keeps its database out of the venv; OPENAI_API_BASE_URL/KEY is the
   connection (llm-stream has no key set; Open WebUI needs some value);
   ENABLE_OLLAMA_API=False stops it polling a local Ollama; WEBUI_AUTH=False is
   the single-user mode without sign-up; OFFLINE_MODE=True (which sets
   HF_HUB_OFFLINE=1 and turns off the embedding, reranking and Whisper model
   auto-updates and the version check) keeps it from downloading from the hub:
   its default RAG embedding model (sentence-transformers/all-MiniLM-L6-v2) is
   then not found and it logs "Error loading SentenceTransformer" at start and
   goes on; chat does not use it (only documents and web search do).

3. This driver, from the repository root:

    .venv/bin/python scripts/open_webui_demo.py --webui-url http://127.0.0.1:18680 \\
        --record-port 18653 --upstream http://127.0.0.1:18652 --out docs/open-webui.png
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import ConsoleMessage, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

log = logging.getLogger("open_webui_demo")

CHROMIUM = os.environ.get("LLM_STREAM_CHROMIUM", "/usr/bin/chromium")
TOOLS_HEADER = "x-llm-stream-tools"
# Hop-by-hop headers, and the body framing that the proxy redoes itself.
SKIPPED_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


# -- recording proxy -----------------------------------------------------------------------


@dataclass
class Exchange:
    """One request Open WebUI sent to the server, and what came back."""

    method: str
    path: str
    request: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    tools_header: str | None = None
    body: bytes = b""
    seconds: float = 0.0

    def summary(self) -> str:
        req = self.request
        tools = req.get("tools")
        messages = req.get("messages") or []
        first = messages[0].get("content") if messages else ""
        first = first if isinstance(first, str) else json.dumps(first)
        parts = [
            f"{self.method} {self.path} -> {self.status} in {self.seconds:.1f} s",
            f"stream={req.get('stream')!r}",
            f"tools={len(tools) if isinstance(tools, list) else None}",
            f"tool_choice={req.get('tool_choice')!r}",
            f"max_tokens={req.get('max_tokens', req.get('max_completion_tokens'))!r}",
            f"{TOOLS_HEADER}={self.tools_header!r}",
            f"response_format={req.get('response_format')!r}",
            f"messages={len(messages)} (first: {first[:70]!r})",
            f"keys={sorted(req)}",
        ]
        return ", ".join(parts)

    def answer(self) -> str:
        """The answer's text: joined deltas of a stream, or the message of a plain reply."""
        text = self.body.decode("utf-8", "replace")
        if self.request.get("stream"):
            pieces = []
            for line in text.splitlines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                try:
                    chunk = json.loads(line[len("data: ") :])
                except json.JSONDecodeError:
                    continue
                for choice in chunk.get("choices") or []:
                    pieces.append((choice.get("delta") or {}).get("content") or "")
            return "".join(pieces)
        try:
            reply = json.loads(text)
        except json.JSONDecodeError:
            return text
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if choices:
            return str((choices[0].get("message") or {}).get("content"))
        return text


class RecordingProxy:
    """A plain HTTP proxy to one upstream that streams responses through and records them."""

    def __init__(self, port: int, upstream: str) -> None:
        split = urlsplit(upstream)
        self.upstream_host = split.hostname or "127.0.0.1"
        self.upstream_port = split.port or 80
        self.exchanges: list[Exchange] = []
        self.last_activity = time.monotonic()
        self.in_flight = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.forward(self)

            def do_POST(self) -> None:
                proxy.forward(self)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("proxy: " + format, *args)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        log.info(
            "recording proxy on 127.0.0.1:%d -> %s:%d",
            self.server.server_address[1],
            self.upstream_host,
            self.upstream_port,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        started = time.monotonic()
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        exchange = Exchange(handler.command, handler.path)
        if raw:
            try:
                exchange.request = json.loads(raw)
            except json.JSONDecodeError:
                exchange.request = {}
        with self._lock:
            self.in_flight += 1
            self.exchanges.append(exchange)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in SKIPPED_HEADERS}
        upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        try:
            upstream.request(handler.command, handler.path, body=raw or None, headers=headers)
            response = upstream.getresponse()
            exchange.status = response.status
            exchange.tools_header = response.getheader(TOOLS_HEADER)
            # HTTP/1.0 with the body ended by closing the connection: no framing to
            # redo, and server-sent events pass through chunk by chunk as they come.
            handler.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in SKIPPED_HEADERS:
                    handler.send_header(key, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            body = bytearray()
            while chunk := response.read1(65536):
                body += chunk
                handler.wfile.write(chunk)
                handler.wfile.flush()
            exchange.body = bytes(body)
        except OSError as error:
            log.warning("proxy: %s %s failed: %s", handler.command, handler.path, error)
            if not exchange.status:
                exchange.status = 502
                handler.send_error(502, str(error))
        finally:
            upstream.close()
            exchange.seconds = time.monotonic() - started
            with self._lock:
                self.in_flight -= 1
                self.last_activity = time.monotonic()

    async def settle(self, quiet_s: float, limit_s: float) -> None:
        """Wait until no request has been in flight for ``quiet_s`` (background tasks)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = self.in_flight == 0 and time.monotonic() - self.last_activity >= quiet_s
            if idle:
                return
            await asyncio.sleep(0.5)
        log.warning("requests still in flight after %.0f s", limit_s)


# -- the browser ---------------------------------------------------------------------------

LAST_ANSWER = '[id^="message-"]:has(.chat-assistant) >> nth=-1'
ERROR_BUBBLE = '[class*="bg-red-600/10"], [data-sonner-toast][data-type="error"]'


async def chat(page: Page, webui_url: str, prompt: str, timeout_s: float) -> str:
    """Send ``prompt`` on a new chat; return the answer once it is complete."""
    await page.goto(webui_url, wait_until="load")
    # A fresh install first shows the release notes ("What's New"), once per user.
    changelog = page.get_by_text("Okay, Let's Go!")
    try:
        await changelog.click(timeout=8_000)
        log.info("dismissed the release notes")
    except PlaywrightTimeout:
        log.info("no release notes shown")  # shown once per user only
    await page.locator("#chat-input").wait_for(timeout=30_000)
    # With one model served, Open WebUI selects it; check rather than assume.
    selector = page.locator('button[id^="model-selector-"][id$="-button"]').first
    selected = ((await selector.text_content(timeout=10_000)) or "").strip()
    log.info("model selected in the UI: %r", selected)
    if not selected or selected == "Select a model":
        raise SystemExit("Open WebUI lists no model: is OPENAI_API_BASE_URL right?")
    await page.locator("#chat-input").click()
    await page.keyboard.type(prompt)
    await page.locator("#send-message-button").click()
    log.info("sent %r", prompt)

    answer = page.locator(LAST_ANSWER)
    content = answer.locator("#response-content-container")
    # Streaming, as the user sees it: the text grows in steps before it is complete.
    lengths: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await answer.locator('button[aria-label="Regenerate"]').count():
            break  # the action row appears once the message is done
        if await page.locator(ERROR_BUBBLE).count():
            break
        if await content.count():
            text = await content.inner_text()
            if not lengths or len(text) != lengths[-1]:
                lengths.append(len(text))
        await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"no complete answer after {timeout_s:.0f} s")
    if await page.locator(ERROR_BUBBLE).count():
        errors = await page.locator(ERROR_BUBBLE).all_inner_texts()
        raise SystemExit(f"Open WebUI shows an error: {errors}")
    final = (await content.inner_text()).strip()
    grew = [n for n in lengths if 0 < n < len(final)]
    log.info(
        "answer complete (%d characters), seen growing through %d partial lengths: %r",
        len(final),
        len(grew),
        final,
    )
    if not final:
        raise SystemExit("the answer is empty")
    return final


def log_console_error(message: ConsoleMessage) -> None:
    if message.type == "error":
        log.info("browser console error: %s", message.text[:300])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webui-url", default="http://127.0.0.1:18680")
    parser.add_argument("--out", type=Path, default=Path("docs/open-webui.png"))
    parser.add_argument("--prompt", default="Write a haiku about the sea.")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the answer")
    parser.add_argument(
        "--record-port",
        type=int,
        default=0,
        help="run the recording proxy on this port (Open WebUI's OPENAI_API_BASE_URL "
        "must point at it); 0: no proxy",
    )
    parser.add_argument("--upstream", default="http://127.0.0.1:18652", help="llm-stream's HTTP")
    parser.add_argument(
        "--settle", type=float, default=240, help="seconds to wait for background tasks"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not os.access(CHROMIUM, os.X_OK):
        raise SystemExit(f"no Chromium at {CHROMIUM}: run bash scripts/install_browser.sh")

    proxy = RecordingProxy(args.record_port, args.upstream) if args.record_port else None
    if proxy:
        proxy.__enter__()
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox"]
            )
            page = await browser.new_page(
                viewport={"width": 1280, "height": 800}, color_scheme="light"
            )
            page.on("console", log_console_error)
            await chat(page, args.webui_url.rstrip("/"), args.prompt, args.timeout)
            if proxy:
                # Title, follow-up and tag generation run after the answer; let them end
                # so the picture shows what they gave (a title, suggested follow-ups).
                await proxy.settle(quiet_s=3, limit_s=args.settle)
                await asyncio.sleep(2)
            if await page.locator(ERROR_BUBBLE).count():
                errors = await page.locator(ERROR_BUBBLE).all_inner_texts()
                raise SystemExit(f"Open WebUI shows an error: {errors}")
            if await page.get_by_text("Okay, Let's Go!").is_visible():
                await page.get_by_text("Okay, Let's Go!").click()  # late release notes
            args.out.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=args.out)
            log.info("wrote %s", args.out)
            await browser.close()
    finally:
        if proxy:
            proxy.__exit__()
            for exchange in proxy.exchanges:
                log.info("request: %s", exchange.summary())
                if exchange.path.endswith("/chat/completions"):
                    log.info("  answered: %r", exchange.answer()[:300])


if __name__ == "__main__":
    asyncio.run(main())
