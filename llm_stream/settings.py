"""The one explicit configuration object, built by the CLI (``llm_stream.cli``).

Nothing here reads the environment: the CLI resolves flags and ``LLM_STREAM_*``
variables into a :class:`Settings`, and everything else receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 50051
EMBEDDED_MODEL_SOURCE = "embedded"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "llm-stream"


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, with the documented defaults."""

    host: str = "[::]"
    port: int = DEFAULT_PORT
    # Model specs "ID=SOURCE" or "SOURCE"; empty means the embedded default.
    models: tuple[str, ...] = ()
    models_file: Path | None = None
    default_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)
    # Continuous batching, per model: sequences in the batch at once, the
    # batch's KV token budget (rows x the largest prompt + max_tokens among them;
    # None: 65536 on the CPU, what --gpu-memory-utilization leaves on CUDA),
    # requests allowed to wait beyond the free rows, and prompt tokens fed per
    # step while as many sequences decode as wait.
    max_concurrent: int = 64
    max_batch_tokens: int | None = None
    max_queue: int = 256
    prefill_chunk: int = 64
    # CUDA: the decode step replayed from CUDA graphs ("auto") or run eagerly ("off"),
    # and the share of the GPU's memory the model, its activations and its KV cache use.
    cuda_graphs: str = "auto"
    gpu_memory_utilization: float = 0.9
    # Prefix caching: the KV of finished sequences kept for prompts that start the same
    # way (a chat's next turn, a shared system prompt), within the KV budget, and its
    # size in tokens (None: a quarter of --max-batch-tokens on the CPU, a fifth of the
    # KV memory on CUDA, or a quarter of max_batch_tokens when that is set).
    prefix_cache: bool = True
    prefix_cache_tokens: int | None = None
    # Each model's engine core (scheduler, runner, text) in a process of its own ("on"),
    # in the server's process ("off"), or "auto": its own process on CUDA.
    engine_process: str = "auto"
    max_batch_size: int = 32
    default_max_tokens: int = 256
    max_tokens_cap: int = 2048
    drain_grace_s: float = 30.0
    max_message_bytes: int = 100 * 1024 * 1024
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    min_ping_interval_s: float = 10.0
    # Pings closer than min_ping_interval_s a client may send before GOAWAY
    # too_many_pings; 0 means never, so mismatched keepalive never cuts a stream.
    max_ping_strikes: int = 0
    # Close connections after this long (0 = never) so clients re-resolve DNS and
    # spread onto new replicas; streams get max_connection_age_grace_s to finish.
    max_connection_age_s: float = 0.0
    max_connection_age_grace_s: float = 300.0
    compression: str = "gzip"
    # Prometheus metrics over HTTP on this port (same host); 0 turns them off.
    metrics_port: int = 0
    # The OpenAI-compatible HTTP API and the chat page on this port (same host, same
    # process and engine as gRPC); 0 turns it off.
    http_port: int = 8000
    reflection: bool = True
    # TLS on the gRPC port (PEM files, re-read when they change); with tls_client_ca
    # clients must present a certificate signed by it (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # A plaintext port serving only grpc.health.v1 (for probes that cannot speak
    # TLS); 0 turns it off.
    health_port: int = 0
    # Bearer keys, one per line, re-read when the file changes; None: no auth.
    api_keys_file: Path | None = None
    # Generations (running + queued) one API key may hold; 0: no per-key cap.
    max_concurrent_per_key: int = 0
    # How long a client turned away with RESOURCE_EXHAUSTED is told to wait before
    # retrying (grpc-retry-pushback-ms).
    retry_pushback_s: float = 0.5
    warmup_tokens: int = 2
    log_level: str = "INFO"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
