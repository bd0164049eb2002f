"""How a loaded model runs: its attention kernels, its KV budget and its CUDA graphs.

Decided once, at load, before health turns SERVING:

- **Attention**: torch's ``scaled_dot_product_attention``, with cuDNN's backend
  turned off on CUDA: cuDNN builds an execution plan for every new shape, and an
  eager step whose KV width grows by one is a new shape every step (measured on
  an H200: 78% of the step thread in planning, GPU 5-10% busy). The masked
  decode then runs the memory-efficient kernel, unpadded prefill runs flash.
- **KV budget**: on the CPU the batch grows as it needs, bounded by
  ``--max-batch-tokens``; on a GPU every row gets a fixed slot, sized from the
  memory left after the weights, the largest prefill's activations and the
  graphs (``--gpu-memory-utilization``), so that nothing is allocated per step.
- **CUDA graphs** (``--cuda-graphs auto``): the decode forward captured per
  (rows, width) bucket, replayed every step.
- **Prefix cache** (``--prefix-cache on``): on the CPU it shares the batch's token
  budget, and running sequences take back what they need (cached entries are
  evicted); on a GPU, whose slots are fixed, it gets memory of its own, carved
  from the KV memory before the slots are sized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_stream.errors import ModelLoadError
from llm_stream.model.attention import AttentionLayout, attention_layout
from llm_stream.model.cuda_graphs import DecodeGraphs, rows_buckets, width_buckets
from llm_stream.model.prefix_cache import PrefixCache
from llm_stream.model.prefix_index import BLOCK_TOKENS
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.slots import (
    POSITION_ALIGN,
    LayerShape,
    SlotBatch,
    full_history_cache,
    probe_layers,
    round_up,
)

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
# The fewest tokens a GPU row may hold before the KV budget counts as too small.
_MIN_ROW_TOKENS = 256
# Head-room on the measured activation peaks (allocator rounding, fragmentation).
_ACTIVATION_MARGIN = 1.25
# The prefix cache's default size: this fraction of the GPU's KV memory, or of the
# batch's token budget (--max-batch-tokens) where one bounds the batch.
_PREFIX_SHARE_OF_MEMORY = 5
_PREFIX_SHARE_OF_BUDGET = 4


@dataclass(frozen=True)
class ExecutionOptions:
    """The settings that shape a model's runner (from :class:`~llm_stream.settings.Settings`)."""

    max_rows: int = 64
    # Padded KV token budget (rows x the largest prompt + max_tokens); None: 65536 on
    # the CPU, what the GPU's memory allows on CUDA.
    max_batch_tokens: int | None = None
    cuda_graphs: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_prefill_tokens: int = 8192
    # Prefix caching, and the tokens it may keep (None: a quarter of the batch budget on
    # the CPU; on CUDA a fifth of the KV memory, or a quarter of max_batch_tokens).
    prefix_cache: bool = True
    prefix_cache_tokens: int | None = None


CPU_DEFAULT_BATCH_TOKENS = 65536
# Prompt tokens a staged prefill forward takes (padded up): a GPU feeds prompts in
# chunks of these sizes, each replayed from a graph; longer ones in several.
CHUNK_BUCKETS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class PaddedBudget:
    """The CPU batch: rows x the largest prompt + max_tokens among them, at most a total."""

    max_batch_tokens: int

    @property
    def max_sequence_tokens(self) -> int:
        return self.max_batch_tokens

    @property
    def limit_hint(self) -> str:
        return f"--max-batch-tokens {self.max_batch_tokens}"

    def admits(self, costs: Sequence[int], candidate: int) -> bool:
        widest = max([*costs, candidate])
        return (len(costs) + 1) * widest <= self.max_batch_tokens


@dataclass(frozen=True)
class SlotBudget:
    """The GPU batch: a fixed slot per row; a sequence fits when it fits a slot."""

    positions: int
    hint: str

    @property
    def max_sequence_tokens(self) -> int:
        return self.positions

    @property
    def limit_hint(self) -> str:
        return self.hint

    def admits(self, costs: Sequence[int], candidate: int) -> bool:
        return candidate <= self.positions


def configure_attention(device: torch.device, dtype: torch.dtype) -> str:
    """Pick the attention kernels for ``device``; returns what the ready line reports."""
    if device.type != "cuda":
        return "sdpa (CPU kernels)"
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    if dtype in (torch.float16, torch.bfloat16):
        return "sdpa: mem-efficient decode, flash prefill, cuDNN off"
    return "sdpa: mem-efficient, cuDNN off"


def kv_bytes_per_token(layers: list[LayerShape]) -> int:
    return sum(s.bytes_per_token for s in layers)


@torch.inference_mode()
def _activation_peaks(
    model: Any, device: torch.device, rows: int, prefill_tokens: int
) -> tuple[int, int]:
    """Bytes the largest prefill and a decode forward of every row allocate beyond the weights."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros((1, prefill_tokens), dtype=torch.long, device=device)
    model(input_ids=ids, cache=full_history_cache(), use_cache=True, logits_to_keep=1)
    prefill = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    model(input_ids=torch.zeros((rows, 1), dtype=torch.long, device=device), use_cache=False)
    decode = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.empty_cache()
    return prefill, decode


@dataclass(frozen=True)
class GpuKVPlan:
    """The GPU's KV memory: a fixed slot per row, and the prefix cache's tokens."""

    slots: SlotBudget
    prefix_tokens: int


def cpu_prefix_room(max_batch_tokens: int) -> Callable[[Sequence[int]], int]:
    """What the CPU batch's budget leaves for cached prefixes beside running sequences of
    these token costs (the batch is padded: rows x the largest)"""

    def room(costs: Sequence[int]) -> int:
        return max(0, max_batch_tokens - len(costs) * max(costs, default=0))

    return room


def plan_gpu_slots(
    model: Any,
    device: torch.device,
    layers: list[LayerShape],
    options: ExecutionOptions,
    *,
    context_length: int,
    graphs: bool,
) -> GpuKVPlan:
    """Tokens per row slot: what the memory left after weights, activations, graphs and
    the prefix cache holds."""
    prefill_tokens = min(options.max_prefill_tokens, context_length)
    prefill_peak, decode_peak = _activation_peaks(model, device, options.max_rows, prefill_tokens)
    # The graphs' shared pool holds about one decode forward's activations.
    reserve = int(max(prefill_peak, decode_peak) * _ACTIVATION_MARGIN)
    if graphs:
        reserve += int(decode_peak * _ACTIVATION_MARGIN) + 64 * _MIB
    free, total = torch.cuda.mem_get_info(device)
    kept_free = int((1 - options.gpu_memory_utilization) * total)
    available = free - kept_free - reserve
    per_token = kv_bytes_per_token(layers)
    prefix_bytes = 0
    if options.prefix_cache:
        prefix_bytes = (
            options.prefix_cache_tokens * per_token
            if options.prefix_cache_tokens is not None
            else max(0, available) // _PREFIX_SHARE_OF_MEMORY
        )
    positions = (available - prefix_bytes) // max(1, options.max_rows * per_token)
    hint = (
        f"a row's KV slot; --gpu-memory-utilization {options.gpu_memory_utilization} and "
        f"--max-concurrent {options.max_rows} set it"
    )
    if options.max_batch_tokens is not None:
        positions = min(positions, options.max_batch_tokens // options.max_rows)
        hint = f"a row's KV slot: --max-batch-tokens / --max-concurrent {options.max_rows}"
    positions = min(positions, round_up(context_length, POSITION_ALIGN))
    positions = positions // POSITION_ALIGN * POSITION_ALIGN - 1
    if positions < _MIN_ROW_TOKENS:
        raise ModelLoadError(
            f"not enough GPU memory for {options.max_rows} rows of KV cache: "
            f"{free / 2**30:.1f} GiB free after the weights, {kept_free / 2**30:.1f} GiB kept free "
            f"by --gpu-memory-utilization {options.gpu_memory_utilization}, "
            f"{reserve / 2**30:.1f} GiB for activations and graphs, {per_token} bytes a token"
            + (f", {prefix_bytes / 2**30:.1f} GiB for the prefix cache" if prefix_bytes else "")
            + "; lower --max-concurrent or raise --gpu-memory-utilization"
            + (" or lower --prefix-cache-tokens" if prefix_bytes else "")
        )
    # Every row's slot and the staging slot (static_runner's batch has one more).
    slots_bytes = (options.max_rows + 1) * (positions + 1) * per_token
    prefix_tokens = 0
    if options.prefix_cache:
        # Its share, and whatever the slots leave (a slot is capped at the context);
        # a capped KV budget caps the cache too, as on the CPU.
        left = max(0, available - slots_bytes) // per_token
        if options.prefix_cache_tokens is not None:
            prefix_tokens = options.prefix_cache_tokens
        elif options.max_batch_tokens is not None:
            prefix_tokens = min(left, options.max_batch_tokens // _PREFIX_SHARE_OF_BUDGET)
        else:
            prefix_tokens = left
    log.info(
        "KV cache: %d rows x %d tokens, %.2f GiB (%d bytes a token); prefix cache %d tokens, "
        "%.2f GiB; %.2f GiB kept for activations and graphs",
        options.max_rows,
        positions,
        slots_bytes / 2**30,
        per_token,
        prefix_tokens,
        prefix_tokens * per_token / 2**30,
        reserve / 2**30,
    )
    return GpuKVPlan(SlotBudget(positions, hint), prefix_tokens)


def build_runner(
    model: Any, device: torch.device, pad_id: int, options: ExecutionOptions
) -> tuple[HFStepRunner, str]:
    """The model's runner, its graphs captured; and what the ready line says of it."""
    dtype = next(model.parameters()).dtype
    attention = configure_attention(device, dtype)
    layout = attention_layout(model.config)
    layers_text = f"layers={layout.describe()}"
    if device.type != "cuda":
        # No forward here (see probe_layers): the slots take their shapes from the first prefill.
        budget = PaddedBudget(options.max_batch_tokens or CPU_DEFAULT_BATCH_TOKENS)
        batch = SlotBatch(None, 8, 256, device, growable=True, dtype=dtype, layout=layout)
        runner = HFStepRunner(model, batch, budget, pad_id=pad_id)
        kv = f"kv=grows to {budget.max_batch_tokens} tokens"
        if options.prefix_cache:
            total = budget.max_batch_tokens
            tokens = options.prefix_cache_tokens or total // _PREFIX_SHARE_OF_BUDGET
            runner.prefix = PrefixCache(tokens, cpu_prefix_room(total))
        prefix = describe_prefix_cache(runner.prefix)
        return runner, f"attention={attention}, {layers_text}, {kv}, {prefix}"
    layers = probe_layers(model, device)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    want_graphs = options.cuda_graphs == "auto"
    plan = plan_gpu_slots(
        model, device, layers, options, context_length=context, graphs=want_graphs
    )
    slots = plan.slots
    runner = static_runner(
        model, device, pad_id, layers, rows=options.max_rows, budget=slots, layout=layout
    )
    if options.prefix_cache and plan.prefix_tokens >= BLOCK_TOKENS:
        runner.prefix = PrefixCache(plan.prefix_tokens, lambda costs: None)
    prefix = describe_prefix_cache(runner.prefix)
    kv = f"{layers_text}, kv={options.max_rows}x{slots.positions}, {prefix}"
    if not want_graphs:
        return runner, f"attention={attention}, {kv}, cuda-graphs=off"
    assert runner.graphs is not None
    graphs_text = capture_graphs(runner, device, options)
    return runner, f"attention={attention}, {kv}, {graphs_text}"


def describe_prefix_cache(cache: PrefixCache | None) -> str:
    """What the ready line says of the prefix cache."""
    return "prefix-cache=off" if cache is None else f"prefix-cache={cache.capacity} tokens"


def static_runner(
    model: Any,
    device: torch.device,
    pad_id: int,
    layers: list[LayerShape],
    *,
    rows: int,
    budget: SlotBudget,
    layout: AttentionLayout | None = None,
) -> HFStepRunner:
    """A runner over fixed buffers whose decode steps and prompt chunks run by bucket
    (rows or chunk tokens, and attention width), uncaptured until capture_graphs."""
    batch = SlotBatch(
        layers,
        rows,
        budget.positions,
        device,
        growable=False,
        staging=CHUNK_BUCKETS[-1],
        layout=layout or attention_layout(model.config),
    )
    runner = HFStepRunner(model, batch, budget, pad_id=pad_id)
    widths = width_buckets(batch.capacity_positions + 1)
    runner.graphs = DecodeGraphs(rows_buckets(rows), widths, runner.forward_decode)
    runner.chunk_graphs = DecodeGraphs(CHUNK_BUCKETS, widths, runner.forward_chunk)
    return runner


def capture_graphs(runner: HFStepRunner, device: torch.device, options: ExecutionOptions) -> str:
    """Capture the runner's decode graphs; what the ready line says of them."""
    graphs, chunks = runner.graphs, runner.chunk_graphs
    assert graphs is not None and chunks is not None
    try:
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            report = graphs.capture(device, pool)
            prefill = chunks.capture(device, pool)
    except Exception as exc:
        if _out_of_memory(exc):
            raise ModelLoadError(
                f"out of GPU memory capturing the decode CUDA graphs ({len(graphs.sizes)} row "
                f"buckets x {len(graphs.widths)} widths for {options.max_rows} rows): lower "
                "--gpu-memory-utilization or --max-concurrent, or start with --cuda-graphs off"
            ) from exc
        # A model whose forward cannot be captured (it syncs, say) still serves, eagerly.
        log.warning(
            "cannot capture CUDA graphs of this model's decode step (%s); decoding eagerly", exc
        )
        torch.cuda.synchronize(device)
        runner.graphs = runner.chunk_graphs = None
        runner.reset()
        return "cuda-graphs=failed (eager)"
    runner.reset()  # the capture's warm-up runs wrote into free slots
    total = report.graphs + prefill.graphs
    seconds = report.seconds + prefill.seconds
    pool_mib = (report.pool_bytes + prefill.pool_bytes) // _MIB
    log.info(
        "captured %d CUDA graphs in %.1f s, %d MiB: decode %d row buckets x %d widths, "
        "prefill %d chunk sizes x %d widths",
        total,
        seconds,
        pool_mib,
        len(graphs.sizes),
        len(graphs.widths),
        len(chunks.sizes),
        len(chunks.widths),
    )
    return f"cuda-graphs={total} ({seconds:.1f} s, {pool_mib} MiB)"


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what it arose from ran out of device memory (a capture that
    runs out ends with an error about the invalidated capture, the OOM as its context)."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False
