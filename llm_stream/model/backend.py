"""A loaded Hugging Face model behind the engine's ``ModelBackend`` interface.

Prepares requests (chat template, tokenizer, context checks) before they are
admitted, so a request that cannot be served never holds a batch row; builds
each sequence's text assembler; and hands the scheduler a step runner.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm_stream.engine.types import ChatTurn, GenerationRequest, PreparedRequest
from llm_stream.errors import InvalidRequestError
from llm_stream.model.chat import plain_conversation, templated_conversation
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.text_assembler import TextAssembler

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
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

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
        return PreparedRequest(
            request, tuple(ids), min(sampling.max_tokens, room), stop_token_ids=self._eos_ids
        )

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages:
            if request.apply_chat_template is False or not self.has_chat_template:
                text = plain_conversation(request.messages)
                return list(self._tokenizer(text)["input_ids"])
            text = templated_conversation(self._tokenizer, request.messages)
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
            text = templated_conversation(self._tokenizer, [turn])
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


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation: the generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def pad_token_id(tokenizer: Any, eos_ids: frozenset[int]) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else min(eos_ids, default=0))
