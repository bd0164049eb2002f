"""The model layer: loading, device and dtype, tokenizer, detokenisation.

The only layer that imports torch and transformers.
"""
