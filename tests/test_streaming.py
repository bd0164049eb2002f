"""StreamPredict's tokens are exactly Predict's text, token by token, for any script."""

from __future__ import annotations

import asyncio

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llm_stream.model.detokenizer import IncrementalDetokenizer
from llm_stream.model.stop_sequences import StopSequenceFilter
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import RunningServer, collect_stream, prompt_request

PROMPTS = [
    "Hello world",
    "Emoji: 😀 🚀 🎉 👍🏽",
    "日本語のテキスト，中文文本",
    "Mixed: café 🎉 中文 ok",
]


def stream_text(tokens: list[pb.PredictToken]) -> str:
    return "".join(t.token for t in tokens if not t.is_final)


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_stream_concatenates_to_predict_text(tiny_server: RunningServer, prompt: str) -> None:
    request = prompt_request(prompt, max_tokens=60)
    unary = await tiny_server.stub.Predict(request)
    tokens = await collect_stream(tiny_server.stub, request)
    assert stream_text(tokens) == unary.text
    assert unary.text  # the tiny model does generate text for these prompts


async def test_stream_message_shape(tiny_server: RunningServer) -> None:
    tokens = await collect_stream(tiny_server.stub, prompt_request("Hello world", max_tokens=12))
    *body, final = tokens
    assert [t.token_index for t in body] == list(range(len(body)))
    assert all(t.HasField("token_id") and not t.is_final for t in body)
    assert final.is_final and final.token == "" and not final.HasField("token_id")
    assert final.token_index == len(body)
    assert final.usage.completion_tokens == len(body)
    assert final.usage.prompt_tokens > 0
    assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_END_OF_SEQUENCE)
    if final.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(body) == 12


async def test_predict_response_fields(tiny_server: RunningServer) -> None:
    request = prompt_request("Hello world", max_tokens=10)
    request.request_id = "client-chosen-id"
    response = await tiny_server.stub.Predict(request)
    assert response.request_id == "client-chosen-id"
    assert response.predictions["completion_tokens"] == response.usage.completion_tokens
    assert response.predictions["prompt_tokens"] == response.usage.prompt_tokens
    assert response.latency_ms > 0
    assert response.model_version.startswith("sha256-")
    anonymous = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=2))
    assert len(anonymous.request_id) >= 16


async def test_same_seed_same_output_even_beside_other_sampling(
    tiny_server: RunningServer,
) -> None:
    seeded = prompt_request("Hello world", max_tokens=30, temperature=1.0, top_p=0.95, seed=7)
    alone = await tiny_server.stub.Predict(seeded)
    others = [
        tiny_server.stub.Predict(prompt_request("Bonjour", max_tokens=30, temperature=1.2))
        for _ in range(3)
    ]
    together, *_ = await asyncio.gather(tiny_server.stub.Predict(seeded), *others)
    assert together.text == alone.text
    other_seed = await tiny_server.stub.Predict(
        prompt_request("Hello world", max_tokens=30, temperature=1.0, top_p=0.95, seed=8)
    )
    assert other_seed.text != alone.text


async def test_top_k_one_is_greedy(tiny_server: RunningServer) -> None:
    greedy = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=20))
    sampled = await tiny_server.stub.Predict(
        prompt_request("Hello world", max_tokens=20, temperature=1.5, top_k=1, seed=3)
    )
    assert sampled.text == greedy.text


async def test_stop_sequence_is_not_emitted(tiny_server: RunningServer) -> None:
    base = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=40))
    stop = base.text[8:11]
    assert len(stop) == 3
    expected = base.text[: base.text.index(stop)]
    request = prompt_request("Hello world", max_tokens=40, stop=[stop])
    unary = await tiny_server.stub.Predict(request)
    tokens = await collect_stream(tiny_server.stub, request)
    assert unary.text == expected
    assert stream_text(tokens) == expected
    assert unary.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert tokens[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


async def test_repetition_penalty_changes_greedy_output(tiny_server: RunningServer) -> None:
    plain = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=40))
    penalised = await tiny_server.stub.Predict(
        prompt_request("Hello world", max_tokens=40, repetition_penalty=5.0)
    )
    assert penalised.text != plain.text


# -- the detokeniser and stop filter on their own ------------------------------


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: words carry a leading '▁' that decode strips."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False)
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_detokenizer_keeps_sentencepiece_leading_spaces() -> None:
    tokenizer = metaspace_tokenizer()
    ids = tokenizer("the quick brown fox jumps")["input_ids"]
    prompt, generated = ids[:1], ids[1:]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detok.add(i) for i in generated) + detok.flush()
    assert text == " quick brown fox jumps"


def test_detokenizer_holds_back_split_characters(tiny_model_dir: object) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = "Emoji: 😀 🚀 and 日本語 and 👍🏽!"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some tokens carried half a character and were held back


def test_stop_filter_across_pieces() -> None:
    stops = StopSequenceFilter(["</end>", "STOP"])
    out = [stops.feed(piece) for piece in ["Hello </", "e", "nd> more"]]
    assert out == ["Hello ", "", ""]
    assert stops.matched
    assert stops.flush() == ""


def test_stop_filter_releases_false_alarm() -> None:
    stops = StopSequenceFilter(["STOP"])
    assert stops.feed("go ST") == "go "
    assert stops.feed("ART") == "START"
    assert stops.feed("S") == ""
    assert stops.flush() == "S"
    assert not stops.matched
