"""Tools and structured output on the real default model, through the openai SDK.

SmolLM2-135M-Instruct's chat template takes no tools: "auto" answers in text and
says so; a required call and ``response_format`` still hold, by guided decoding
(the tools are described to the model in a system message). About 15 tokens/s on
2 cores, so the answers are kept short.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from llm_stream.settings import Settings
from tests.conftest import RunningServer, free_port, running_server
from tests.test_e2e_default_model import model_cache_dir
from tests.test_http_api import sdk
from tests.test_tools_api import PARAMETERS, RECIPE_SCHEMA, TOOLS, assert_valid_calls

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
WEATHER_IN_PARIS = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
async def default_http() -> AsyncIterator[RunningServer]:
    settings = Settings(
        host="127.0.0.1", port=0, http_port=free_port(), cache_dir=model_cache_dir()
    )
    async with running_server(settings) as running:
        yield running


@pytest.mark.parametrize("stream", [False, True])
async def test_a_recipe_in_json_matching_its_schema(
    default_http: RunningServer, stream: bool
) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give me a simple pancake recipe."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "recipe", "schema": RECIPE_SCHEMA},
        },
        "max_tokens": 200,
        "temperature": 0,
    }
    client = sdk(default_http)
    if stream:
        pieces = [
            chunk.choices[0].delta.content or ""
            async for chunk in await client.chat.completions.create(**request, stream=True)
            if chunk.choices
        ]
        text = "".join(pieces)
    else:
        text = (await client.chat.completions.create(**request)).choices[0].message.content or ""
    recipe = json.loads(text)
    jsonschema.validate(recipe, RECIPE_SCHEMA)


async def test_a_required_call_then_its_result_then_an_answer(default_http: RunningServer) -> None:
    client = sdk(default_http)
    first = await client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_IN_PARIS,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = list(choice.message.tool_calls or ())
    assert_valid_calls(calls, set(PARAMETERS))
    result = {"role": "tool", "tool_call_id": calls[0].id, "content": '{"celsius": 18}'}
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[*WEATHER_IN_PARIS, choice.message.model_dump(exclude_none=True), result],  # type: ignore[list-item]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=40,
        temperature=0,
    )
    answer = raw.parse().choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # SmolLM2's template takes no tools: "auto" is answered in text, and the header says so.
    assert raw.headers["x-llm-stream-tools"].startswith("ignored: ")
