"""The test suite. Importing it first sets OpenMP up as the server's main() does."""

from llm_stream.runtime import tune_openmp

tune_openmp()  # before anything imports torch: see llm_stream/runtime.py
