"""llm-stream: serve Hugging Face causal language models over gRPC, token by token."""

__version__ = "0.1.0"
