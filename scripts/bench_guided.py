"""What guided decoding costs a step: the grammar masks, and a whole batch step.

Three tables, on the default model (the embedded SmolLM2-135M-Instruct, 49,152-token
vocabulary), with a nested JSON schema (objects, enums, an array, bounded strings
and integers):

1. **Engines**: each grammar engine that is installed fills one bitmask per row,
   serially, every step (median ms per step for the whole batch, and the step where
   it was slowest), at 1, 32 and 64 rows: xgrammar (what the server uses), and for
   comparison llguidance and outlines-core when importable (install them beside,
   e.g. ``pip install --target /tmp/alt --no-deps llguidance outlines-core`` and run
   with ``PYTHONPATH=/tmp/alt``).
2. **Masks**: per step, every row's matcher fills its bitmask (serially, on the
   host) and the runner masks the logits (:class:`llm_stream.model.guided.GuidedRows`,
   the code the runner uses); then each row takes a token. Median and p90 ms per
   step for the whole batch, at 1, 32 and 64 rows. No model: random logits.
3. **Steps** (``--no-steps`` skips it): the engine's scheduler and runner decoding
   the same number of free rows and of constrained rows, greedy (sampling over the
   whole vocabulary sorts it, and sorts faster when most of it is masked: that
   would flatter the constrained rows); median ms per decode step, the better of two
   alternated runs.

    .venv/bin/python scripts/bench_guided.py [--rows 1,32,64] [--step-rows 1,8,32]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from llm_stream.runtime import tune_openmp

tune_openmp()  # as the server does, before torch loads

import torch  # noqa: E402
import xgrammar  # noqa: E402

from llm_stream.engine.scheduler import BatchLimits, Scheduler  # noqa: E402
from llm_stream.engine.sequence import Sequence as Seq  # noqa: E402
from llm_stream.engine.types import (  # noqa: E402
    GenerationRequest,
    JsonConstraint,
    SamplingParams,
)
from llm_stream.model.backend import HFBackend  # noqa: E402
from llm_stream.model.guided import Grammars, GuidedRows, logits_width  # noqa: E402
from llm_stream.model.loader import load_backend  # noqa: E402
from llm_stream.model.sources import ModelSpec, embedded_gguf_path  # noqa: E402
from llm_stream.settings import default_cache_dir  # noqa: E402

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "kind": {"enum": ["cat", "dog", "fox"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
            "owner": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                    "ok": {"type": "boolean"},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 12},
                            "zip": {"type": "string", "maxLength": 5},
                        },
                        "required": ["city"],
                    },
                },
                "required": ["id", "ok", "address"],
            },
        },
        "required": ["name", "kind", "owner"],
    }
)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def mask_costs(
    grammars: Grammars, vocab: int, stop_ids: Collection[int], rows: int, steps: int
) -> dict[str, float]:
    """ms per step for ``rows`` constrained rows: filling and applying the masks, and
    accepting the tokens drawn from the masked random logits."""
    guide = grammars.compile(JsonConstraint(SCHEMA))
    guided = GuidedRows(torch.device("cpu"))
    keys = list(range(rows))
    guided.start(keys, [guide] * rows)
    generator = torch.Generator().manual_seed(0)
    fills, applies, accepts = [], [], []
    for _ in range(steps):
        logits = torch.randn((rows, vocab), generator=generator)
        started = time.perf_counter()
        filled = guided.fill(keys, vocab)
        filled_at = time.perf_counter()
        assert filled is not None
        masked = guided.apply(logits, *filled)
        applied_at = time.perf_counter()
        tokens = torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=generator)
        chosen = tokens.flatten().tolist()
        accepting = time.perf_counter()
        guided.accept(list(zip(keys, chosen, strict=True)))
        accepts.append(time.perf_counter() - accepting)
        fills.append(filled_at - started)
        applies.append(applied_at - filled_at)
        ended = [k for k, token in zip(keys, chosen, strict=True) if token in stop_ids]
        guided.drop(ended)  # a row whose document ended starts a new one
        guided.start(ended, [guide] * len(ended))
    return {
        "fill": statistics.median(fills) * 1000,
        "fill_p90": percentile(fills, 0.9) * 1000,
        "apply": statistics.median(applies) * 1000,
        "accept": statistics.median(accepts) * 1000,
    }


class EngineRows:
    """One grammar engine's matchers for ``rows`` rows of SCHEMA, behind one interface."""

    def __init__(self, name: str, fresh: Any, fill: Any, accept: Any, done: Any) -> None:
        self.name = name
        self.fresh, self.fill, self.accept, self.done = fresh, fill, accept, done


def xgrammar_rows(tokenizer: Any, vocab: int, stop_ids: list[int]) -> EngineRows:
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=stop_ids
    )
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(SCHEMA, any_whitespace=False)
    return EngineRows(
        "xgrammar",
        lambda: xgrammar.GrammarMatcher(grammar),
        lambda m, host, row: m.fill_next_token_bitmask(host, row),
        lambda m, token: m.accept_token(token),
        lambda m: m.is_terminated(),
    )


def llguidance_rows(tokenizer: Any, vocab: int, stop_ids: list[int]) -> EngineRows:
    llguidance = importlib.import_module("llguidance")
    hf, kernels = (importlib.import_module(f"llguidance.{m}") for m in ("hf", "torch"))
    lltok = hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=stop_ids[0])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    return EngineRows(
        "llguidance",
        lambda: llguidance.LLMatcher(lltok, grammar),
        kernels.fill_next_token_bitmask,
        lambda m, token: m.consume_token(token),
        lambda m: m.is_stopped(),
    )


def outlines_rows(tokenizer: Any, vocab: int, stop_ids: list[int]) -> EngineRows:
    outlines_core = importlib.import_module("outlines_core")
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    special = set(info.special_token_ids) | set(stop_ids)
    tokens: dict[bytes, list[int]] = {}
    for token, text in enumerate(info.decoded_vocab):
        if token not in special and len(text):
            tokens.setdefault(bytes(text), []).append(token)
    vocabulary = outlines_core.Vocabulary(stop_ids[0], tokens)
    regex = outlines_core.json_schema.build_regex_from_schema(SCHEMA)
    index = outlines_core.Index(regex, vocabulary)

    def fill(guide: Any, host: torch.Tensor, row: int) -> None:
        view = host[row]
        guide.write_mask_into(view.data_ptr(), view.numel(), view.element_size())

    return EngineRows(
        "outlines-core",
        lambda: outlines_core.Guide(index),
        fill,
        lambda g, token: g.advance(token),
        lambda g: g.is_finished(),
    )


def engine_fill(engine: EngineRows, vocab: int, rows: int, steps: int) -> tuple[float, float]:
    """Median and slowest ms per step to fill ``rows`` bitmasks serially; tokens are drawn
    from random logits under the mask, and a row whose document ends starts another."""
    matchers = [engine.fresh() for _ in range(rows)]
    host = torch.empty((rows, (vocab + 31) // 32), dtype=torch.int32)
    guided = GuidedRows(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    fills = []
    for _ in range(steps):
        started = time.perf_counter()
        for row, matcher in enumerate(matchers):
            engine.fill(matcher, host, row)
        fills.append(time.perf_counter() - started)
        logits = guided.apply(torch.randn((rows, vocab), generator=generator), [], host)
        chosen = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        for row, token in enumerate(chosen.flatten().tolist()):
            engine.accept(matchers[row], token)
            if engine.done(matchers[row]):
                matchers[row] = engine.fresh()
    return statistics.median(fills) * 1000, max(fills) * 1000


def step_times(backend: HFBackend, rows: int, guided: bool, steps: int) -> float:
    """Median ms of the decode steps in which all ``rows`` rows decode."""
    runner = backend.new_runner()
    scheduler = Scheduler(runner, BatchLimits(max_rows=rows), lambda outputs: None)
    constraint = JsonConstraint(SCHEMA) if guided else None
    sequences = [
        Seq(
            backend.prepare(
                GenerationRequest(
                    f"r{i}",
                    "",
                    f"Describe pet number {i} as JSON.",
                    SamplingParams(max_tokens=steps + 2),
                    apply_chat_template=True,
                    constraint=constraint,
                )
            )
        )
        for i in range(rows)
    ]
    scheduler.submit(*sequences)
    times = []
    while not all(s.finished for s in sequences):
        decoding = scheduler.running == rows and all(s.generated > 0 for s in sequences)
        started = time.perf_counter()
        scheduler.step()
        if decoding:
            times.append(time.perf_counter() - started)
    runner.reset()
    return statistics.median(times) * 1000 if times else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,32,64", help="batch sizes of the mask table")
    parser.add_argument("--steps", type=int, default=200, help="steps per mask measurement")
    parser.add_argument("--step-rows", default="1,8,32", help="batch sizes of the step table")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--no-steps", action="store_true", help="masks only (no model forward)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    out = sys.stdout.write
    spec = ModelSpec("smollm2", "gguf", str(embedded_gguf_path()))
    backend = load_backend(spec, "cpu", "auto", args.cache_dir)
    model: Any = backend._model
    vocab = logits_width(model)
    grammars = Grammars(spec.model_id, backend._tokenizer, vocab, backend._eos_ids)
    compile_started = time.perf_counter()
    grammars.compile(JsonConstraint(SCHEMA))
    compile_ms = (time.perf_counter() - compile_started) * 1000
    out(
        f"xgrammar {xgrammar.__dict__.get('__version__', _version('xgrammar'))}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; vocabulary {vocab}; "
        f"first compile (tokenizer info + schema) {compile_ms:.0f} ms\n\n"
    )
    out("bitmask fill per step, whole batch, serial, ms: median (slowest step)\n")
    row_counts = [int(r) for r in args.rows.split(",")]
    out("| engine | " + " | ".join(f"{r} rows" for r in row_counts) + " |\n")
    out("|---|" + "---:|" * len(row_counts) + "\n")
    stops = sorted(backend._eos_ids)
    for build in (xgrammar_rows, llguidance_rows, outlines_rows):
        name = build.__name__.removesuffix("_rows").replace("outlines", "outlines-core")
        try:
            engine = build(backend._tokenizer, vocab, stops)
        except ImportError:
            out(f"| {name} | not installed |\n")
            continue
        except Exception as exc:  # an engine that cannot take the schema or tokenizer
            out(f"| {name} | failed: {exc} |\n")
            continue
        cells = []
        for rows in row_counts:
            median, slowest = engine_fill(engine, vocab, rows, args.steps)
            cells.append(f"{median:.2f} ({slowest:.1f})")
        out(f"| {engine.name} | " + " | ".join(cells) + " |\n")
    out("\nguided decoding per step, whole batch, ms: fill every row's bitmask (serially, host),\n")
    out("apply the masks to the logits (torch), advance every matcher by its token\n")
    out("| rows | fill median | fill p90 | apply median | accept median |\n")
    out("|---:|---:|---:|---:|---:|\n")
    for rows in row_counts:
        c = mask_costs(grammars, vocab, backend._eos_ids, rows, args.steps)
        out(
            f"| {rows} | {c['fill']:.2f} | {c['fill_p90']:.2f} | {c['apply']:.2f} "
            f"| {c['accept']:.2f} |\n"
        )
    if args.no_steps:
        return 0
    out("\ngreedy decode step of the whole batch (scheduler + runner, CPU), median ms\n")
    out("| rows | free rows | constrained rows | difference |\n")
    out("|---:|---:|---:|---:|\n")
    for rows in (int(r) for r in args.step_rows.split(",")):
        # Alternated and repeated: the better of two runs each, on a noisy machine.
        runs = [step_times(backend, rows, g, args.decode_steps) for g in (False, True) * 2]
        free, guided = min(runs[0::2]), min(runs[1::2])
        out(f"| {rows} | {free:.1f} | {guided:.1f} | {guided - free:+.1f} |\n")
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
