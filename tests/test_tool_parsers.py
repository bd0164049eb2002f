"""The tool-call parsers, as pure functions: per format, whole and streamed in chunks
down to one character, with what models get wrong returned as content."""

from __future__ import annotations

import json
import random
import re

import pytest

from llm_stream.engine.types import ToolCall
from llm_stream.tool_calls import (
    ContentDelta,
    Delta,
    ToolCallDelta,
    parse_tool_calls,
    stream_for,
    tool_format_of,
)

NAMES = ("get_weather", "get_time")
MARKERS = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
PARIS = '{"city": "Paris", "unit": "celsius"}'
CET = '{"zone": "CET"}'


def hermes(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def streamed(
    tool_format: str, text: str, sizes: list[int] | None = None, names: tuple[str, ...] = NAMES
) -> list[Delta]:
    """``text`` fed in pieces of ``sizes`` (cycled; default one character each)."""
    stream = stream_for(tool_format, names)
    deltas: list[Delta] = []
    sizes = sizes or [1]
    at, turn = 0, 0
    while at < len(text):
        size = sizes[turn % len(sizes)]
        deltas += stream.feed(text[at : at + size])
        at, turn = at + size, turn + 1
    return deltas + stream.finish()


def content_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, ContentDelta))


def calls_of(deltas: list[Delta]) -> list[tuple[str, str]]:
    """(name, arguments) per call index, arguments joined across deltas."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta):
            call = calls.setdefault(delta.index, ["", ""])
            call[0] += delta.name
            call[1] += delta.arguments
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def named(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in calls]


def assert_same_streamed(tool_format: str, text: str) -> tuple[str, list[ToolCall]]:
    """The whole-text answer, checked equal to the one-character and odd-sized streams."""
    content, calls = parse_tool_calls(tool_format, text, NAMES)
    for sizes in ([1], [2, 3], [7, 1, 4], [len(text) or 1]):
        deltas = streamed(tool_format, text, sizes)
        assert content_of(deltas) == content, sizes
        assert calls_of(deltas) == named(calls), sizes
    return content, calls


# (format, text, expected content, expected calls): valid output of each format.
VALID = [
    ("hermes", hermes("get_weather", PARIS), "", [("get_weather", PARIS)]),
    (
        "hermes",
        f"{hermes('get_weather', PARIS)}\n{hermes('get_time', CET)}",
        "",
        [("get_weather", PARIS), ("get_time", CET)],
    ),
    (
        "hermes",
        f"Let me look that up.\n\n{hermes('get_weather', PARIS)}",
        "Let me look that up.",
        [("get_weather", PARIS)],
    ),
    (
        "mistral",
        f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {PARIS}}}]',
        "",
        [("get_weather", PARIS)],
    ),
    # The marker is a special token: skipped in decoding, the array comes bare.
    (
        "mistral",
        f' [{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", '
        f'"arguments": {CET}}}]',
        "",
        [("get_weather", PARIS), ("get_time", CET)],
    ),
    (
        "mistral",
        f'Sure. [TOOL_CALLS][{{"name": "get_time", "arguments": {CET}}}]',
        "Sure.",
        [("get_time", CET)],
    ),
    (
        "llama3_json",
        f'{{"name": "get_weather", "parameters": {PARIS}}}',
        "",
        [("get_weather", PARIS)],
    ),
    (
        "llama3_json",
        f'{{"name": "get_weather", "parameters": {PARIS}}}; {{"name": "get_time", '
        f'"parameters": {CET}}}',
        "",
        [("get_weather", PARIS), ("get_time", CET)],
    ),
    (
        "llama3_json",
        f'I will check. <|python_tag|>{{"name": "get_time", "parameters": {CET}}}',
        "I will check.",
        [("get_time", CET)],
    ),
    ("forced", f'[{{"name": "get_weather", "arguments": {PARIS}}}]', "", [("get_weather", PARIS)]),
    (
        "forced",
        f'[ {{"name": "get_weather", "arguments": {PARIS}}},\n  {{"name": "get_time", '
        f'"arguments": {CET}}} ]',
        "",
        [("get_weather", PARIS), ("get_time", CET)],
    ),
]


@pytest.mark.parametrize(("tool_format", "text", "content", "calls"), VALID)
def test_valid_calls_parse_the_same_whole_and_streamed(
    tool_format: str, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    got_content, got_calls = assert_same_streamed(tool_format, text)
    assert got_content == content
    assert named(got_calls) == calls
    assert not any(marker in got_content for marker in MARKERS)


@pytest.mark.parametrize(("tool_format", "text", "content", "calls"), VALID)
def test_no_piece_of_a_marker_reaches_content(
    tool_format: str, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for delta in streamed(tool_format, text):
        if isinstance(delta, ContentDelta):
            assert not re.search(r"[<>\[\]{}|]", delta.text), delta


def test_a_call_streams_as_its_head_then_its_arguments() -> None:
    deltas = streamed("hermes", f"Hi {hermes('get_weather', PARIS)}{hermes('get_time', CET)}")
    assert deltas[0] == ContentDelta("H") and content_of(deltas) == "Hi"
    heads = [d for d in deltas if isinstance(d, ToolCallDelta) and d.id]
    assert [(d.index, d.name, d.arguments) for d in heads] == [
        (0, "get_weather", ""),
        (1, "get_time", ""),
    ]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", d.id) for d in heads)
    assert heads[0].id != heads[1].id
    tails = [d for d in deltas if isinstance(d, ToolCallDelta) and not d.id]
    assert [(d.index, d.name, d.arguments) for d in tails] == [(0, "", PARIS), (1, "", CET)]


def test_text_is_held_only_while_it_may_begin_a_marker() -> None:
    stream = stream_for("hermes")
    assert stream.feed("Use a <") == [ContentDelta("Use a")]
    assert stream.feed("b> tag") == [ContentDelta(" <b> tag")]
    assert stream.feed(" <tool_") == []
    assert stream.feed("box> please") == [ContentDelta(" <tool_box> please")]
    assert stream.finish() == []


def test_an_answer_without_calls_is_the_text_exactly() -> None:
    text = "  Two lines,\n\nthen spaces  \n"
    for tool_format in ("hermes", "mistral", "llama3_json", "forced"):
        assert parse_tool_calls(tool_format, text) == (text, [])
        assert content_of(streamed(tool_format, text)) == text


def test_text_after_calls_is_content_and_whitespace_around_them_is_dropped() -> None:
    text = f"\n{hermes('get_time', CET)}\n\nDone.\n"
    content, calls = assert_same_streamed("hermes", text)
    assert content == "\n\nDone." and named(calls) == [("get_time", CET)]


# (format, text): output that is not a valid call, returned whole as content.
MALFORMED = [
    ("hermes", "Here: <tool_call>\n{not json}\n</tool_call> sorry"),
    ("hermes", f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}</tool_call>'),
    ("hermes", '<tool_call>{"name": "get_weather"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>'),
    ("hermes", "<tool_call></tool_call>"),
    ("mistral", "[TOOL_CALLS] [1, 2]"),
    ("mistral", "[TOOL_CALLS] not json at all"),
    ("mistral", "[1] See the footnote."),
    ("llama3_json", '{"name": "Ada", "age": 36}'),
    ("llama3_json", '{"answer": 42} is the JSON you asked for'),
    ("forced", '[{"name": "get_weather", "arguments": "not an object"}]'),
]


@pytest.mark.parametrize(("tool_format", "text"), MALFORMED)
def test_malformed_output_is_returned_as_content(tool_format: str, text: str) -> None:
    assert assert_same_streamed(tool_format, text) == (text, [])


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        ("hermes", hermes("delete_everything", "{}")),
        ("mistral", '[TOOL_CALLS][{"name": "delete_everything", "arguments": {}}]'),
        ("llama3_json", '{"name": "delete_everything", "parameters": {}}'),
        ("forced", '[{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]'),
    ],
)
def test_a_call_to_a_function_not_offered_is_content(tool_format: str, text: str) -> None:
    assert assert_same_streamed(tool_format, text) == (text, [])
    # Without the list of names, any name is taken.
    assert parse_tool_calls(tool_format, text)[1]


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        ("hermes", 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city"'),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"'),
        ("forced", '[{"name": "get_weather", "arguments": {"city": "Paris"}}'),
        ("forced", "["),
    ],
)
def test_a_call_cut_off_at_the_end_is_content(tool_format: str, text: str) -> None:
    assert assert_same_streamed(tool_format, text) == (text, [])


def test_a_whole_call_missing_only_its_end_marker_still_counts() -> None:
    for text in (hermes("get_time", CET)[: -len("</tool_call>")], hermes("get_time", CET)[:-3]):
        assert named(assert_same_streamed("hermes", text)[1]) == [("get_time", CET)]


def test_arguments_are_normalised_to_a_json_object_text() -> None:
    text = (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Zürich\\"}"}'
        '</tool_call><tool_call>{"function": {"name": "get_time", "arguments": {}}}</tool_call>'
    )
    _, calls = assert_same_streamed("hermes", text)
    assert named(calls) == [("get_weather", '{"city": "Zürich"}'), ("get_time", "{}")]
    assert json.loads(calls[0].arguments) == {"city": "Zürich"}


def test_strings_with_brackets_and_escapes_do_not_end_a_call_early() -> None:
    arguments = json.dumps({"city": 'Pa]ri}s "quoted" \\ [x] {y}'})
    text = f'[{{"name": "get_weather", "arguments": {arguments}}}] trailing words'
    content, calls = assert_same_streamed("forced", text)
    assert content == " trailing words"
    assert json.loads(calls[0].arguments) == json.loads(arguments)


def test_random_chunkings_agree_with_the_whole_text() -> None:
    rng = random.Random(13)
    text = (
        f"Intro <b>bold</b> [1] {{x}}\n{hermes('get_weather', PARIS)} mid "
        f"<tool_call>broken</tool_call>\n{hermes('get_time', CET)}\n"
    )
    whole_content, whole_calls = parse_tool_calls("hermes", text, NAMES)
    assert named(whole_calls) == [("get_weather", PARIS), ("get_time", CET)]
    assert whole_content == "Intro <b>bold</b> [1] {x} mid <tool_call>broken</tool_call>"
    for _ in range(50):
        sizes = [rng.randint(1, 9) for _ in range(20)]
        deltas = streamed("hermes", text, sizes)
        assert content_of(deltas) == whole_content
        assert calls_of(deltas) == named(whole_calls)


def test_an_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format"):
        stream_for("xml")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, None),
        ("", None),
        ("{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}", None),
        ("{% if tools %}<tool_call>{% endif %}", "hermes"),
        ("{% if tools %}[TOOL_CALLS]{% endif %}", "mistral"),
        ("{% if tools %}<|python_tag|>{% endif %}", "llama3_json"),
        ("{% if tools %}<|start_header_id|>ipython{% endif %}", "llama3_json"),
        ("{% if tools %}<|tool▁call▁begin|>{% endif %}", None),
    ],
)
def test_the_format_is_read_from_the_template(template: str | None, expected: str | None) -> None:
    assert tool_format_of(template) == expected
