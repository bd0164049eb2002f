"""What a model brings besides its weights: refusals at start, sampling defaults, EOS ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    T5Config,
)

from llm_stream import serve
from llm_stream.client import InferenceClient
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import (
    collect_stream,
    free_port,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.model_families import build_family_model

PROMPT = "The quick brown fox jumps over the lazy dog."


def _config_only(folder: Path, config: Any) -> Path:
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: _config_only(d, T5Config()), "encoder-decoder"),
        (lambda d: _config_only(d, AutoConfig.for_model("vit")), "no causal language model"),
        (
            lambda d: _config_only(
                d, AutoConfig.for_model("llama4_text", num_hidden_layers=2, attention_chunk_size=8)
            ),
            "chunked local attention",
        ),
        (
            lambda d: _config_only(d, AutoConfig.for_model("qwen3_next", num_hidden_layers=4)),
            "linear attention",
        ),
    ],
    ids=["t5", "vit", "llama4", "qwen3-next"],
)
async def test_a_model_that_cannot_be_served_is_refused_at_start_saying_why(
    make: Any, says: str, tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make(tmp_path / "model")
    settings = tiny_settings(folder, cache_dir)
    with caplog.at_level(logging.ERROR):
        assert await serve.run(settings) == 1
    refusals = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert refusals and says in refusals[0], refusals
    assert "Traceback" not in refusals[0]


async def test_a_model_that_needs_its_own_code_is_refused_without_running_it(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "acme"
    folder.mkdir()
    auto_map = {"AutoConfig": "configuration_acme.AcmeConfig"}
    (folder / "config.json").write_text(json.dumps({"model_type": "acme", "auto_map": auto_map}))
    (folder / "configuration_acme.py").write_text("raise SystemExit('remote code ran')\n")
    with caplog.at_level(logging.ERROR):
        assert await serve.run(tiny_settings(folder, cache_dir)) == 1
    assert any("trust_remote_code" in r.getMessage() for r in caplog.records)


# -- the model's generation_config.json -------------------------------------------------

DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}


@torch.inference_mode()
def _greedy(folder: Path, prompt_ids: list[int], count: int) -> list[int]:
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False, eos_token_id=None
    )
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.fixture(scope="module")
def model_with_defaults(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A Gemma 3 shape whose generation config names sampling defaults and, like Gemma's
    ``<end_of_turn>``, a second EOS id: a token its greedy output reaches at step 4."""
    folder = build_family_model("gemma3", tiny_model_dir, tmp_path_factory.mktemp("g") / "m")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    greedy = _greedy(folder, tokenizer(PROMPT)["input_ids"], 12)
    stop_at = next(i for i in range(3, 12) if greedy[i] not in greedy[:i])
    eos = [tokenizer.eos_token_id, greedy[stop_at]]
    GenerationConfig(
        do_sample=True, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **DEFAULTS
    ).save_pretrained(folder)
    (folder / "expected.json").write_text(json.dumps(greedy[: stop_at + 1]))
    return folder


async def test_the_models_sampling_defaults_fill_what_a_request_leaves_unset(
    model_with_defaults: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(model_with_defaults, cache_dir, http_port=free_port())
    with caplog.at_level(logging.INFO):
        async with running_server(settings) as running:
            async with httpx.AsyncClient(base_url=running.http_url) as http:
                card = (await http.get("/v1/models")).json()["data"][0]
                assert card["sampling_defaults"] == DEFAULTS
                completion = (
                    await http.post(
                        "/v1/completions",
                        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "seed": 5},
                    )
                ).json()
            stub = running.stub
            unset = prompt_request(
                PROMPT, apply_chat_template=False, max_tokens=3, seed=5, use_model_temperature=True
            )
            explicit = prompt_request(
                PROMPT, apply_chat_template=False, max_tokens=3, seed=5, **DEFAULTS
            )
            plain = prompt_request(
                PROMPT, apply_chat_template=False, max_tokens=3, seed=5, temperature=0.7, top_k=400
            )
            texts = [(await stub.Predict(m)).text for m in (unset, explicit, plain)]
            async with InferenceClient(running.target) as client:
                from_client = await client.predict(
                    PROMPT,
                    apply_chat_template=False,
                    max_tokens=3,
                    seed=5,
                    use_model_temperature=True,
                )
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready")]
    assert (
        "sampling defaults: temperature=0.7 top_p=0.8 top_k=20 repetition_penalty=1.1" in ready[0]
    )
    assert texts[0] == texts[1] == completion["choices"][0]["text"] == from_client.text
    assert texts[2] != texts[1], "the defaults changed nothing: a weak test"


async def test_every_eos_id_of_the_generation_config_ends_generation(
    model_with_defaults: Path, cache_dir: Path
) -> None:
    expected = json.loads((model_with_defaults / "expected.json").read_text())
    async with running_server(tiny_settings(model_with_defaults, cache_dir)) as running:
        tokens = await collect_stream(
            running.stub,
            # The greedy run above had no repetition penalty; the model's default has one.
            prompt_request(PROMPT, apply_chat_template=False, max_tokens=12, repetition_penalty=1),
        )
    assert [t.token_id for t in tokens if not t.is_final] == expected
    assert tokens[-1].finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
