"""A tiny random-weight Llama with a byte-level BPE tokenizer trained in-process.

Builds in well under a second, so most tests run against a real server on a
real model folder without the 135M default. Byte-level BPE splits emoji and CJK
into several tokens, so detokenisation paths get exercised for real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming tokens to chat frontends over gRPC, one token at a time.",
    "Hello world! Bonjour le monde. Hallo Welt.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀 🚀 🎉 👍🏽 and numbers 0123456789.",
] * 20


# A chat template in the usual shape (ChatML-like), refusing what many templates refuse.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role ' + m['role']) }}{% endif %}"
    "{% if loop.index0 == 0 and m['role'] == 'assistant' %}"
    "{{ raise_exception('Conversations must not start with an assistant turn') }}{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_model(
    folder: Path, seed: int = 0, context: int = 4096, chat_template: str | None = None
) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
