"""A loaded Hugging Face model behind the engine's ``ModelBackend`` interface.

Prepares requests (chat template, tokenizer, context checks) before they are
admitted, so a request that cannot be served never holds a batch row; builds
each sequence's text assembler; and hands the scheduler a step runner.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from llm_stream.engine.types import GenerationRequest, PreparedRequest
from llm_stream.errors import InvalidRequestError
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
    ) -> None:
        self.model_id = model_id
        self.version = version
        self.device = str(device)
        self._model = model
        self._tokenizer = tokenizer
        self._torch_device = device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        self._eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self._eos_ids, default=0))
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # -- preparation -------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenize and check against the model's context; InvalidRequestError if it cannot fit."""
        use_template = request.apply_chat_template
        if use_template is None:
            use_template = self.has_chat_template
        if use_template and not self.has_chat_template:
            raise InvalidRequestError(
                f"model {self.model_id!r} has no chat template; "
                "send config.apply_chat_template = false or leave it unset"
            )
        if use_template:
            text = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": request.prompt}],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self._tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise InvalidRequestError("features['prompt'] tokenizes to nothing; send some text")
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens but model {self.model_id!r} accepts at most "
                f"{self.context_length} tokens of context; shorten the prompt"
            )
        sampling = request.sampling
        if sampling.max_tokens > room and sampling.max_tokens_explicit:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds "
                f"model {self.model_id!r}'s context of {self.context_length} tokens; "
                f"ask for at most {room} tokens or shorten the prompt"
            )
        return PreparedRequest(request, tuple(ids), min(sampling.max_tokens, room))

    def text_assembler(self, prepared: PreparedRequest) -> TextAssembler:
        return TextAssembler(
            self._tokenizer,
            prepared.prompt_ids,
            self._eos_ids,
            prepared.max_new_tokens,
            prepared.request.sampling.stop,
        )

    def new_runner(self) -> HFStepRunner:
        return HFStepRunner(self._model, self._torch_device, self._pad_id)
