"""Tools, assistant calls and tool results through real chat templates.

The templates under tests/chat_templates/ are the models' own (their sources are in
that folder's README); the default model's is read from its GGUF. They render with a
real ``PreTrainedTokenizerFast`` built in-process, and through ``HFBackend.prepare``
on tiny random models carrying them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_stream.engine.types import (
    ChatTurn,
    GenerationRequest,
    JsonConstraint,
    SamplingParams,
    ToolCall,
    ToolSpec,
)
from llm_stream.errors import InvalidRequestError
from llm_stream.model.chat import chat_template_text, plain_conversation, templated_conversation
from llm_stream.model.loader import load_backend
from llm_stream.model.sources import embedded_gguf_path, parse_model_spec
from llm_stream.tool_calls import tool_format_of
from tests.tiny_model import CHAT_TEMPLATE as TINY_TEMPLATE
from tests.tiny_model import build_tiny_model

TEMPLATES = Path(__file__).parent / "chat_templates"
FORMATS = {
    "qwen2_5": "hermes",
    "qwen3": "hermes",
    "llama3_1": "llama3_json",
    "mistral_v0_3": "mistral",
}
WEATHER = ToolSpec(
    "get_weather",
    "The weather forecast for a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
TIME = ToolSpec("get_time", "The time in a zone", '{"type": "object", "properties": {}}')
ASK = ChatTurn("user", "What is the weather in Paris and in Lima?")
CALLS = ChatTurn(
    "assistant",
    "",
    (
        ToolCall("call_0123456789abcdef01234567", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_76543210fedcba9876543210", "get_weather", '{"city": "Lima"}'),
    ),
)
RESULTS = (
    ChatTurn(
        "tool", "18 degrees", tool_call_id="call_0123456789abcdef01234567", name="get_weather"
    ),
    ChatTurn(
        "tool", "25 degrees", tool_call_id="call_76543210fedcba9876543210", name="get_weather"
    ),
)
CONVERSATION = (ASK, CALLS, *RESULTS)


def template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


def smollm2_template() -> str:
    """The default model's template, from the metadata of its GGUF."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def tokenizer_with(chat_template: str) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer; rendering a template needs no real vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = chat_template
    return fast


def render(family: str, messages: tuple[ChatTurn, ...], tools: tuple[ToolSpec, ...] = ()) -> str:
    text = template(family)
    tool_format = tool_format_of(text)
    return templated_conversation(
        tokenizer_with(text), messages, tools=tools, tool_format=tool_format
    )


@pytest.mark.parametrize(("family", "expected"), sorted(FORMATS.items()))
def test_the_format_of_each_real_template(family: str, expected: str) -> None:
    assert tool_format_of(template(family)) == expected


def test_the_default_models_template_takes_no_tools() -> None:
    assert tool_format_of(smollm2_template()) is None
    assert tool_format_of(TINY_TEMPLATE) is None


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_tools_appear_in_the_prompt_and_only_when_sent(family: str) -> None:
    prompt = render(family, (ASK,), tools=(WEATHER, TIME))
    for text in ("get_weather", "The weather forecast for a city", '"city"', "get_time"):
        assert text in prompt, text
    assert ASK.content in prompt
    bare = render(family, (ASK,))
    assert "get_weather" not in bare and ASK.content in bare
    for section in ("<tools>", "[AVAILABLE_TOOLS]", "Environment: ipython"):
        assert section not in bare


@pytest.mark.parametrize("family", sorted(FORMATS))
def test_calls_and_results_render_in_the_models_own_format(family: str) -> None:
    prompt = render(family, CONVERSATION, tools=(WEATHER,))
    assert "18 degrees" in prompt and "25 degrees" in prompt
    key = "parameters" if family == "llama3_1" else "arguments"
    # Arguments as JSON objects, not JSON strings quoted again.
    for city in ("Paris", "Lima"):
        assert f'"{key}": {{"city": "{city}"}}' in prompt
    if FORMATS[family] == "hermes":
        assert prompt.count('<tool_call>\n{"name": "get_weather"') == 2
        assert prompt.count("<tool_response>") == 2
    if family == "llama3_1":  # one call per assistant turn, results as ipython turns
        assert prompt.count("<|start_header_id|>ipython<|end_header_id|>") == 2


def test_mistral_gets_call_ids_of_nine_characters_matched_to_their_results() -> None:
    prompt = render("mistral_v0_3", CONVERSATION, tools=(WEATHER,))
    call_ids = re.findall(r'"id": "([^"]*)"', prompt)
    result_ids = re.findall(r'"call_id": "([^"]*)"', prompt)
    assert len(call_ids) == 2 and all(re.fullmatch(r"[0-9a-zA-Z]{9}", i) for i in call_ids)
    assert result_ids == call_ids and call_ids[0] != call_ids[1]
    assert "[TOOL_CALLS]" in prompt and "[TOOL_RESULTS]" in prompt


def test_a_template_refusing_a_shape_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match=r"cannot render.*must alternate"):
        render("mistral_v0_3", (ASK, ASK))


@pytest.mark.parametrize("source", ["smollm2", "tiny"])
def test_templates_without_tools_render_calls_and_results_as_text(source: str) -> None:
    text = smollm2_template() if source == "smollm2" else TINY_TEMPLATE
    prompt = templated_conversation(tokenizer_with(text), CONVERSATION, tools=(WEATHER,))
    assert "<|im_start|>tool" not in prompt and "<s>tool" not in prompt
    assert '[{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    # Both results in one user turn, each naming the call it answers.
    results = prompt[prompt.index("Result of get_weather") :]
    assert "call_0123456789abcdef01234567" in results and "18 degrees" in results
    assert "call_76543210fedcba9876543210" in results and "25 degrees" in results
    assert prompt.count("user\n") == 2
    # Tools offered without a forced call are left out.
    assert "The weather forecast for a city" not in prompt


def test_a_forced_call_describes_the_tools_where_the_template_cannot() -> None:
    tokenizer = tokenizer_with(smollm2_template())
    prompt = templated_conversation(tokenizer, (ASK,), tools=(WEATHER, TIME), constrained=True)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    assert "The weather forecast for a city" in system and "get_time" in system
    assert "SmolLM" not in prompt  # our system message replaces the template's default
    with_system = (ChatTurn("system", "Be brief."), ASK)
    prompt = templated_conversation(tokenizer, with_system, tools=(WEATHER,), constrained=True)
    assert prompt.count("<|im_start|>system") == 1
    assert prompt.index("Be brief.") < prompt.index("get_weather")


def test_the_plain_fallback_renders_tool_turns_and_forced_tools() -> None:
    text = plain_conversation(CONVERSATION)
    assert text.startswith(f"User: {ASK.content}\n\nAssistant: [")
    assert "User: Result of get_weather (call call_0123456789abcdef01234567):\n18 degrees" in text
    assert text.endswith("25 degrees\n\nAssistant:")
    assert "get_time" not in plain_conversation((ASK,), tools=(TIME,))
    forced = plain_conversation((ASK,), tools=(TIME,), constrained=True)
    assert forced.startswith("System: You can call these functions") and "get_time" in forced


def test_named_templates_are_read_together() -> None:
    named = SimpleNamespace(chat_template={"default": "{{ x }}", "tool_use": template("qwen2_5")})
    assert tool_format_of(chat_template_text(named)) == "hermes"


# -- through the backend, on tiny random models carrying the templates -----------------


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen"
    return build_tiny_model(folder, chat_template=template("qwen2_5"))


def prepared_prompt(folder: Path, cache: Path, **fields: object) -> tuple[str | None, str]:
    backend = load_backend(parse_model_spec(f"m={folder}"), "cpu", "auto", cache)
    request = GenerationRequest("r", "m", "", SamplingParams(max_tokens=8), **fields)  # type: ignore[arg-type]
    prepared = backend.prepare(request)
    return backend.tool_format, backend._tokenizer.decode(prepared.prompt_ids)


def test_the_backend_renders_tools_for_a_model_that_takes_them(
    qwen_model: Path, tmp_path: Path
) -> None:
    tool_format, prompt = prepared_prompt(
        qwen_model, tmp_path, messages=CONVERSATION, tools=(WEATHER,)
    )
    assert tool_format == "hermes"
    assert "<tools>" in prompt and "The weather forecast for a city" in prompt
    assert prompt.count("<tool_response>") == 2


def test_the_backend_describes_forced_tools_for_a_model_without_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = build_tiny_model(tmp_path / "tiny-chat", chat_template=TINY_TEMPLATE)
    forced = {"tools": (WEATHER,), "constraint": JsonConstraint("{}")}
    tool_format, prompt = prepared_prompt(folder, tmp_path, messages=CONVERSATION, **forced)
    assert tool_format is None
    assert "The weather forecast for a city" in prompt and "25 degrees" in prompt
    _, prompt = prepared_prompt(folder, tmp_path, messages=CONVERSATION, tools=(WEATHER,))
    assert "The weather forecast for a city" not in prompt
    # No template at all: the plain fallback.
    _, prompt = prepared_prompt(tiny_model_dir, tmp_path, messages=(ASK,), **forced)
    assert prompt.startswith("System: You can call these functions")
