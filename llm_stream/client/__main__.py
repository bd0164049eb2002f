"""``python -m llm_stream.client "prompt"``: stream a completion to the terminal;
``--chat`` holds a multi-turn conversation."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from llm_stream.client import DEFAULT_TARGET, Conversation, InferenceClient
from llm_stream.proto.inference.v1 import inference_pb2 as pb

log = logging.getLogger("llm_stream.client")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_stream.client", description=__doc__)
    parser.add_argument(
        "prompt", nargs="?", help="the prompt; '-' reads it from standard input (not with --chat)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="interactive multi-turn chat: each line you type is a user turn, the whole "
        "conversation is sent each time; /reset forgets it, Ctrl-D ends",
    )
    parser.add_argument("--system", default="", help="a system message opening the conversation")
    parser.add_argument(
        "--target",
        default=os.environ.get("LLM_STREAM_TARGET", DEFAULT_TARGET),
        help="host:port, several comma-separated, or dns:///name:port "
        f"(env LLM_STREAM_TARGET; default {DEFAULT_TARGET})",
    )
    parser.add_argument("--model", default="", help="model_id; empty is the server default")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument(
        "--model-temperature",
        action="store_true",
        help="sample at the model's default temperature (its generation_config.json)",
    )
    parser.add_argument("--max-tokens", type=int, default=0, help="0 is the server default")
    parser.add_argument("--top-p", type=float, default=0.0, help="0 is the model's default")
    parser.add_argument("--top-k", type=int, default=0, help="0 is the model's default")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=0.0, help="0 is the model's default"
    )
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    parser.add_argument(
        "--json-schema",
        type=Path,
        default=None,
        metavar="FILE",
        help="answer in JSON matching the JSON Schema in FILE (guided decoding); "
        '{"type": "object"} asks for any JSON object',
    )
    parser.add_argument("--unary", action="store_true", help="use Predict instead of streaming")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    parser.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the server to be ready"
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--tls", action="store_true", help="speak TLS, checking the server against system roots"
    )
    security.add_argument(
        "--ca-cert", type=Path, default=None, help="PEM CA that signed the server (implies --tls)"
    )
    security.add_argument(
        "--client-cert", type=Path, default=None, help="PEM certificate for mTLS (implies --tls)"
    )
    security.add_argument("--client-key", type=Path, default=None, help="its PEM private key")
    security.add_argument(
        "--api-key",
        default=os.environ.get("LLM_STREAM_API_KEY"),
        help="sent as 'authorization: Bearer <key>' (env LLM_STREAM_API_KEY, which keeps "
        "the key out of the process list)",
    )
    return parser


def _client(parser: argparse.ArgumentParser, args: argparse.Namespace) -> InferenceClient:
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    try:
        return InferenceClient(
            args.target,
            tls=args.tls,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            api_key=args.api_key or None,
        )
    except OSError as exc:
        parser.error(f"cannot read {exc.filename}: {exc.strerror}")
    except ValueError as exc:  # a target or key that cannot be used
        parser.error(str(exc))


def read_json_schema(parser: argparse.ArgumentParser, path: Path | None) -> str:
    """The text of ``--json-schema FILE``, checked to be a JSON object ("" without one)."""
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8")
        schema = json.loads(text)
    except OSError as exc:
        parser.error(f"--json-schema: cannot read {path}: {exc.strerror}")
    except (ValueError, RecursionError) as exc:
        parser.error(f"--json-schema: {path} is not valid JSON: {exc}")
    if not isinstance(schema, dict):
        parser.error(f"--json-schema: {path} must hold a JSON Schema object")
    return text


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "json_schema": args.json_schema_text,
        "model_id": args.model,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "repetition_penalty": args.repetition_penalty,
        "apply_chat_template": False if args.raw else None,
        "use_model_temperature": args.model_temperature and args.temperature == 0,
    }


async def _stream_to_stdout(
    client: InferenceClient, prompt: str | Conversation, args: argparse.Namespace
) -> str:
    """Stream one answer to stdout as it arrives; returns its text."""
    parts = []
    async for token in client.stream(prompt, timeout=args.timeout, **_options(args)):
        if token.is_final:
            sys.stdout.write("\n")
            log.info(
                "finish=%s prompt_tokens=%d (cached %d) completion_tokens=%d",
                pb.FinishReason.Name(token.finish_reason),
                token.usage.prompt_tokens,
                token.usage.cached_prompt_tokens,
                token.usage.completion_tokens,
            )
        else:
            parts.append(token.token)
            sys.stdout.write(token.token)
        sys.stdout.flush()
    return "".join(parts)


async def chat(args: argparse.Namespace, client: InferenceClient) -> int:
    """Read user turns line by line; stream each answer; keep the history."""
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(opening)
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = await asyncio.to_thread(sys.stdin.readline)  # never block the loop
        if not line:
            sys.stderr.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(opening)
            log.info("conversation reset")
            continue
        turn = [*history, {"role": "user", "content": text}]
        try:
            answer = await _stream_to_stdout(client, turn, args)
        except grpc.aio.AioRpcError as exc:
            # The turn is dropped; the conversation so far stays.
            log.error("%s: %s", exc.code().name, exc.details())
            continue
        history = [*turn, {"role": "assistant", "content": answer}]


async def run(args: argparse.Namespace, client: InferenceClient) -> int:
    async with client:
        await client.wait_ready(timeout=args.wait)
        if args.chat:
            return await chat(args, client)
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt: str | Conversation = text
        if args.system:
            prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": text}]
        if args.unary:
            response = await client.predict(prompt, timeout=args.timeout, **_options(args))
            sys.stdout.write(response.text + "\n")
            log.info(
                "finish=%s prompt_tokens=%d (cached %d) completion_tokens=%d latency=%.0f ms "
                "version=%s",
                pb.FinishReason.Name(response.finish_reason),
                response.usage.prompt_tokens,
                response.usage.cached_prompt_tokens,
                response.usage.completion_tokens,
                response.latency_ms,
                response.model_version,
            )
            return 0
        await _stream_to_stdout(client, prompt, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chat and args.prompt is not None:
        parser.error("--chat reads its turns from the terminal: give no prompt")
    if not args.chat and args.prompt is None:
        parser.error("give a prompt ('-' reads standard input), or --chat")
    args.json_schema_text = read_json_schema(parser, args.json_schema)
    logging.basicConfig(level=logging.INFO, format="[%(message)s]", stream=sys.stderr)
    try:
        return asyncio.run(_run(parser, args))
    except grpc.aio.AioRpcError as exc:
        log.error("%s: %s", exc.code().name, exc.details())
        return 1
    except (TimeoutError, ConnectionError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # The channel is made inside the event loop that uses it.
    return await run(args, _client(parser, args))


if __name__ == "__main__":
    sys.exit(main())
