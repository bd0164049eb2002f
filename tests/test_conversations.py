"""Conversations (PredictRequest.messages): rendered by the chat template, or by the
documented plain fallback; the client and the terminal chat send them."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from llm_stream.client import InferenceClient, continuation, make_request
from llm_stream.engine.types import ChatTurn
from llm_stream.model.chat import plain_conversation
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import RunningServer, collect_stream, running_server, tiny_settings
from tests.test_errors import assert_clear
from tests.tiny_model import CHAT_TEMPLATE, build_tiny_model

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a story"},
]


@pytest.fixture(scope="module")
def templated_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("templated") / "tiny", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
async def templated_server(
    templated_model_dir: Path, cache_dir: Path
) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(
        templated_model_dir, cache_dir, models=(f"chat={templated_model_dir}",)
    )
    async with running_server(settings) as running:
        yield running


def template_token_count(model_dir: Path, conversation: list[dict[str, str]]) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def plain_token_count(model_dir: Path, conversation: list[dict[str, str]]) -> int:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = plain_conversation([ChatTurn(m["role"], m["content"]) for m in conversation])
    return len(tokenizer(text)["input_ids"])


async def test_a_conversation_is_rendered_with_the_chat_template(
    templated_server: RunningServer, templated_model_dir: Path
) -> None:
    request = make_request(CONVERSATION, max_tokens=6)
    response = await templated_server.stub.Predict(request, timeout=30)
    assert response.usage.prompt_tokens == template_token_count(templated_model_dir, CONVERSATION)
    tokens = await collect_stream(templated_server.stub, request, timeout=30)
    assert "".join(t.token for t in tokens) == response.text
    assert tokens[-1].usage.prompt_tokens == response.usage.prompt_tokens

    # A one-message conversation is the same request as a prompt in the template.
    single = make_request([{"role": "user", "content": "Hello there"}], max_tokens=6)
    as_prompt = make_request("Hello there", max_tokens=6)
    one = await templated_server.stub.Predict(single, timeout=30)
    other = await templated_server.stub.Predict(as_prompt, timeout=30)
    assert (one.text, one.usage.prompt_tokens) == (other.text, other.usage.prompt_tokens)


async def test_a_model_without_a_template_gets_the_plain_fallback(
    tiny_server: RunningServer, tiny_model_dir: Path
) -> None:
    response = await tiny_server.stub.Predict(make_request(CONVERSATION, max_tokens=4), timeout=30)
    assert response.usage.prompt_tokens == plain_token_count(tiny_model_dir, CONVERSATION)
    assert plain_conversation([ChatTurn("system", "S"), ChatTurn("user", "U")]) == (
        "System: S\n\nUser: U\n\nAssistant:"
    )


def conversation_request(*turns: tuple[str, str], prompt: str | None = None) -> pb.PredictRequest:
    request = pb.PredictRequest(config=pb.InferenceConfig(max_tokens=4))
    request.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in turns)
    if prompt is not None:
        request.features["prompt"].string_value = prompt
    return request


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        (conversation_request(("user", "hi"), prompt="hi"), ("messages", "features['prompt']")),
        (conversation_request(("user", "hi"), ("bot", "hello")), ("messages[1].role", "'bot'")),
        (conversation_request(("user", ""), ("assistant", "")), ("conversation is empty",)),
        (pb.PredictRequest(), ("features['prompt'] is missing", "messages")),
    ],
    ids=["both", "unknown-role", "empty", "neither"],
)
async def test_bad_conversations_are_invalid_argument(
    tiny_server: RunningServer, request_: pb.PredictRequest, fragments: tuple[str, ...]
) -> None:
    for call in (
        tiny_server.stub.Predict(request_, timeout=30),
        collect_stream(tiny_server.stub, request_, timeout=30),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert_clear(raised.value, grpc.StatusCode.INVALID_ARGUMENT, *fragments)


async def test_conversations_the_template_refuses_or_that_do_not_fit(
    templated_server: RunningServer,
) -> None:
    refused = conversation_request(("assistant", "I speak first"), ("user", "hi"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await templated_server.stub.Predict(refused, timeout=30)
    assert_clear(raised.value, grpc.StatusCode.INVALID_ARGUMENT, "chat template", "must not start")
    long = conversation_request(*[("user", "tell me a story " * 200)] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await templated_server.stub.Predict(long, timeout=30)
    assert_clear(
        raised.value,
        grpc.StatusCode.INVALID_ARGUMENT,
        "the conversation is",
        "shorten the conversation",
    )
    # The server goes on serving.
    assert (await templated_server.stub.Predict(make_request("hi", max_tokens=2))).text is not None


async def test_the_client_sends_a_conversation(
    templated_server: RunningServer, templated_model_dir: Path
) -> None:
    async with InferenceClient(templated_server.target) as client:
        tokens = [t async for t in client.stream(CONVERSATION, max_tokens=5)]
        response = await client.predict(CONVERSATION, max_tokens=5)
    assert "".join(t.token for t in tokens) == response.text
    assert response.usage.prompt_tokens == template_token_count(templated_model_dir, CONVERSATION)


async def test_terminal_chat_keeps_the_history(
    tiny_server: RunningServer, tiny_model_dir: Path
) -> None:
    """Two turns typed into --chat: the second request carries the first exchange."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_stream.client",
        "--chat",
        "--target",
        tiny_server.target,
        "--max-tokens",
        "5",
        "--system",
        "Be brief.",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = await asyncio.wait_for(process.communicate(b"Hello there\nAnd then?\n"), 120)
    assert process.returncode == 0, err.decode()
    # Greedy answers of the tiny model hold no newline, so stdout is one line per answer.
    first = out.decode().split("\n")[0]
    prompt_counts = [
        int(line.split("prompt_tokens=")[1].split()[0])
        for line in err.decode().splitlines()
        if "prompt_tokens=" in line
    ]
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert prompt_counts[0] == plain_token_count(tiny_model_dir, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert prompt_counts[1] == plain_token_count(tiny_model_dir, history)


@pytest.mark.parametrize("model", ["chat", "plain"])
async def test_a_cut_answer_is_carried_on_from_its_text(
    model: str, templated_server: RunningServer, tiny_server: RunningServer
) -> None:
    """continue_final_message renders the last assistant turn open: greedy, the model
    carries on from the text so far, so the cut answer's first tokens plus the
    continuation are the whole answer (the resumed stream's request). Where the text so
    far reads back as other tokens (a character held back, bytes the tokenizer merges
    differently), the continuation is the model's reading of that text instead."""
    server = templated_server if model == "chat" else tiny_server
    whole = await collect_stream(server.stub, make_request(CONVERSATION, max_tokens=12))
    ids, prompt_tokens = [t.token_id for t in whole[:-1]], whole[-1].usage.prompt_tokens
    same_tokens = 0
    for cut in range(1, 12):
        text = "".join(t.token for t in whole[:cut])
        prompt, options = continuation(CONVERSATION, text, cut, {"max_tokens": 12})
        assert options == {"max_tokens": 12 - cut, "continue_final_message": True}
        rest = await collect_stream(server.stub, make_request(prompt, **options))
        assert rest[-1].is_final and len(rest) - 1 <= 12 - cut
        if rest[-1].usage.prompt_tokens == prompt_tokens + cut:  # the text read back alike
            same_tokens += 1
            assert [t.token_id for t in rest[:-1]] == ids[cut:], cut
            assert text + "".join(t.token for t in rest) == "".join(t.token for t in whole)
    assert same_tokens >= 1  # random weights emit stray bytes; the e2e test has real text


async def test_continuing_needs_an_assistant_message_last(tiny_server: RunningServer) -> None:
    for turns in ([("user", "hi")], [("assistant", "hi"), ("user", "go on")]):
        request = conversation_request(*turns)
        request.config.continue_final_message = True
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tiny_server.stub.Predict(request, timeout=30)
        assert_clear(
            raised.value, grpc.StatusCode.INVALID_ARGUMENT, "continue_final_message", "assistant"
        )
    prompt = make_request("hi", continue_final_message=True)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await tiny_server.stub.Predict(prompt, timeout=30)
    assert_clear(raised.value, grpc.StatusCode.INVALID_ARGUMENT, "must be an assistant message")


def test_a_continuation_request_per_prompt_kind() -> None:
    # Nothing came yet: the same request again.
    assert continuation("Hi", "", 0, {"max_tokens": 8}) == ("Hi", {"max_tokens": 8})
    # A prompt in the chat template: a user turn and the open assistant turn.
    prompt, options = continuation("Hi", "Hello", 2, {"max_tokens": 8, "seed": 1})
    assert prompt == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert options == {"max_tokens": 6, "seed": 1, "continue_final_message": True}
    # A raw prompt (no template): the text goes on after it; max_tokens 0 stays the default.
    raw = {"apply_chat_template": False, "max_tokens": 0}
    assert continuation("Once", " upon", 1, raw) == ("Once upon", raw)
    # A second cut carries the same assistant turn on further.
    again = continuation(prompt, " there", 3, options)
    assert again[0][-1] == {"role": "assistant", "content": "Hello there"}
    assert len(again[0]) == 2 and again[1]["max_tokens"] == 3
