"""A loaded Hugging Face model behind the engine's ``GenerationBackend`` interface.

Runs ``generate`` on the calling (worker) thread. Streaming goes through a
streamer that turns each new token into a text delta; a stopping criterion reads
the request's stop signal so a cancelled request stops within one decode step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from llm_stream.engine.types import (
    Completion,
    EmitFn,
    FinishReason,
    GenerationRequest,
    StopSignal,
    StreamEnd,
    TokenEvent,
)
from llm_stream.errors import InvalidRequestError
from llm_stream.model.sampling import PerRowSampler, make_row
from llm_stream.model.text_assembler import TextAssembler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPrompt:
    request: GenerationRequest
    ids: list[int]
    max_new_tokens: int


class _StopStream(StoppingCriteria):
    """Ends a single-row generation when signalled or when its text is complete."""

    def __init__(self, stop: StopSignal, assembler: TextAssembler) -> None:
        self._stop = stop
        self._assembler = assembler

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self._stop.is_set() or self._assembler.done
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _StopFinishedRows(StoppingCriteria):
    """Feeds each row's new token to its assembler; a row stops when its assembler is done."""

    def __init__(self, assemblers: Sequence[TextAssembler], stop: StopSignal) -> None:
        self._assemblers = assemblers
        self._stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        done = []
        for assembler, token_id in zip(self._assemblers, last, strict=True):
            if not assembler.done:
                assembler.add(int(token_id))
            done.append(assembler.done or self._stop.is_set())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _DeltaStreamer(BaseStreamer):
    """Receives tokens from ``generate`` and emits one TokenEvent per generated token."""

    def __init__(self, assembler: TextAssembler, stop: StopSignal, emit: EmitFn) -> None:
        self._assembler = assembler
        self._stop = stop
        self._emit = emit
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        if self._assembler.done or self._stop.is_set():
            return
        token_id = int(value.reshape(-1)[0])
        index = self._assembler.count
        delta = self._assembler.add(token_id)
        if not self._emit(TokenEvent(index=index, text=delta, token_id=token_id)):
            self._stop.set()  # the consumer is gone: stop the model

    def end(self) -> None:
        pass


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

    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
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
        return PreparedPrompt(request, list(ids), min(sampling.max_tokens, room))

    def _assembler(self, prepared: PreparedPrompt) -> TextAssembler:
        return TextAssembler(
            self._tokenizer,
            prepared.ids,
            self._eos_ids,
            prepared.max_new_tokens,
            prepared.request.sampling.stop,
        )

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(self._eos_ids),
            pad_token_id=self._pad_id,
        )

    # -- generation --------------------------------------------------------

    def stream(self, request: GenerationRequest, stop: StopSignal, emit: EmitFn) -> StreamEnd:
        prepared = self.prepare(request)
        assembler = self._assembler(prepared)
        input_ids = torch.tensor([prepared.ids], device=self._torch_device)
        row = make_row(request.sampling, 0, self._torch_device)
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(prepared.max_new_tokens),
                logits_processor=[PerRowSampler([row])],
                stopping_criteria=StoppingCriteriaList([_StopStream(stop, assembler)]),
                streamer=_DeltaStreamer(assembler, stop, emit),
            )
        reason = assembler.finish_reason
        if reason is None:
            reason = FinishReason.CANCELLED if stop.is_set() else FinishReason.LENGTH
        return StreamEnd(reason, len(prepared.ids), assembler.count)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], stop: StopSignal
    ) -> list[Completion | Exception]:
        results: list[Completion | Exception] = []
        prepared: list[PreparedPrompt] = []
        slots: list[int] = []
        for request in requests:
            try:
                prepared.append(self.prepare(request))
                slots.append(len(results))
                results.append(InvalidRequestError("not generated"))  # replaced below
            except InvalidRequestError as exc:
                results.append(exc)
        if prepared:
            for slot, completion in zip(slots, self._run_batch(prepared, stop), strict=True):
                results[slot] = completion
        return results

    def _run_batch(self, prepared: list[PreparedPrompt], stop: StopSignal) -> list[Completion]:
        width = max(len(p.ids) for p in prepared)
        ids = torch.full((len(prepared), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prepared), width), dtype=torch.long)
        rows = []
        for i, p in enumerate(prepared):
            pad = width - len(p.ids)
            ids[i, pad:] = torch.tensor(p.ids)
            mask[i, pad:] = 1
            rows.append(make_row(p.request.sampling, pad, self._torch_device))
        assemblers = [self._assembler(p) for p in prepared]
        with torch.inference_mode():
            self._model.generate(
                input_ids=ids.to(self._torch_device),
                attention_mask=mask.to(self._torch_device),
                generation_config=self._generation_config(max(p.max_new_tokens for p in prepared)),
                logits_processor=[PerRowSampler(rows)],
                stopping_criteria=StoppingCriteriaList([_StopFinishedRows(assemblers, stop)]),
            )
        return [
            Completion(
                text=a.text,
                finish_reason=a.finish_reason
                or (FinishReason.CANCELLED if stop.is_set() else FinishReason.LENGTH),
                prompt_tokens=len(p.ids),
                completion_tokens=a.count,
                model_version=self.version,
            )
            for a, p in zip(assemblers, prepared, strict=True)
        ]
