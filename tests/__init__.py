"""The test suite. Importing it first sets OpenMP up as the server's main() does."""

from llm_stream.runtime import prefer_passive_openmp

prefer_passive_openmp()  # before anything imports torch: see llm_stream/runtime.py
