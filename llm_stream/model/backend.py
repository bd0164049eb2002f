"""A loaded Hugging Face model behind the engine's ``ModelBackend`` interface.

Prepares requests (chat template, tokenizer, context checks) before they are
admitted, so a request that cannot be served never holds a batch row; builds
each sequence's text assembler; and hands the scheduler a step runner.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from llm_stream.engine.types import (
    SAMPLING_DEFAULT_FIELDS,
    ChatTurn,
    GenerationRequest,
    PreparedRequest,
    with_model_defaults,
)
from llm_stream.errors import InvalidRequestError
from llm_stream.model.chat import chat_template_text, plain_conversation, templated_conversation
from llm_stream.model.guided import Grammars, logits_width
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.text_assembler import TextAssembler
from llm_stream.tool_calls import tool_format_of

log = logging.getLogger(__name__)


class HFBackend:
    def __init__(
        self,
        model_id: str,
        model: Any,
        tokenizer: Any,
        version: str,
        device: torch.device,
        *,
        runner: HFStepRunner,
        execution: str,
    ) -> None:
        self.model_id = model_id
        self.version = version
        self.device = str(device)
        self.execution = execution
        self._model = model
        self._tokenizer = tokenizer
        self._runner = runner
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._eos_ids = eos_token_ids(model, tokenizer)
        # Guided decoding's grammars, compiled for this tokenizer and logits width.
        self._grammars = Grammars(model_id, tokenizer, logits_width(model), self._eos_ids)
        self.sampling_defaults = sampling_defaults(model)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # How the model writes tool calls (None: its template takes no tools).
        self.tool_format = tool_format_of(chat_template_text(tokenizer))

    # -- preparation -------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check against the model's context; InvalidRequestError if it cannot fit."""
        ids = self._prompt_ids(request)
        what = "the conversation" if request.messages else "the prompt"
        if not ids:
            raise InvalidRequestError(f"{what} tokenizes to nothing; send some text")
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"{what} is {len(ids)} tokens but model {self.model_id!r} accepts at most "
                f"{self.context_length} tokens of context; shorten {what}"
            )
        sampling = request.sampling
        if sampling.max_tokens > room and sampling.max_tokens_explicit:
            raise InvalidRequestError(
                f"{what} ({len(ids)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                f"model {self.model_id!r}'s context of {self.context_length} tokens; "
                f"ask for at most {room} tokens or shorten {what}"
            )
        if sampling.unset:
            sampling = with_model_defaults(sampling, self.sampling_defaults)
            request = dataclasses.replace(request, sampling=sampling)
        grammar = None
        if request.constraint is not None:  # compiled here, on a preparation thread
            grammar = self._grammars.compile(request.constraint)
        return PreparedRequest(
            request,
            tuple(ids),
            min(sampling.max_tokens, room),
            stop_token_ids=self._eos_ids,
            grammar=grammar,
        )

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tools = request.tools
        constrained = request.constraint is not None
        if request.messages:
            if request.apply_chat_template is False or not self.has_chat_template:
                text = plain_conversation(
                    request.messages,
                    request.continue_final_message,
                    tools=tools,
                    constrained=constrained,
                )
                return list(self._tokenizer(text)["input_ids"])
            text = templated_conversation(
                self._tokenizer,
                request.messages,
                request.continue_final_message,
                tools=tools,
                tool_format=self.tool_format,
                constrained=constrained,
            )
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        use_template = request.apply_chat_template
        if use_template is None:
            use_template = self.has_chat_template
        if use_template and not self.has_chat_template:
            raise InvalidRequestError(
                f"model {self.model_id!r} has no chat template; "
                "send config.apply_chat_template = false or leave it unset"
            )
        if use_template:
            turn = ChatTurn("user", request.prompt)
            text = templated_conversation(
                self._tokenizer,
                [turn],
                tools=tools,
                tool_format=self.tool_format,
                constrained=constrained,
            )
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self._tokenizer(request.prompt)["input_ids"])

    def text_assembler(self, prepared: PreparedRequest) -> TextAssembler:
        return TextAssembler(
            self._tokenizer,
            prepared.prompt_ids,
            self._eos_ids,
            prepared.max_new_tokens,
            prepared.request.sampling.stop,
        )

    def new_runner(self) -> HFStepRunner:
        """The runner built at load (its KV cache and CUDA graphs are the model's own)."""
        return self._runner


def sampling_defaults(model: Any) -> Mapping[str, float]:
    """The sampling settings the model's generation_config.json recommends (those it
    names), which fill a request's unset ones: Llama 3's temperature 0.6 and top_p 0.9,
    Qwen's top_k 20 and repetition_penalty 1.05, Gemma 3's top_k 64..."""
    config = getattr(model, "generation_config", None)
    valid = {
        "temperature": lambda v: v >= 0,
        "top_p": lambda v: 0 < v <= 1,
        "top_k": lambda v: v >= 0 and float(v).is_integer(),
        "repetition_penalty": lambda v: v > 0,
    }
    found: dict[str, float] = {}
    for name in SAMPLING_DEFAULT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and valid[name](value):
            found[name] = int(value) if name == "top_k" else float(value)
        elif value is not None:
            log.warning("ignoring the model's generation_config %s=%r: out of range", name, value)
    return found


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation: the generation config's (Llama 3's ``<|eot_id|>``,
    Gemma's ``<end_of_turn>``, gpt-oss's ``<|return|>`` where the model names them there)
    and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def pad_token_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else min(eos_ids, default=0))
