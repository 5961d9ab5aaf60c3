"""Benchmarks: ``mtpserve bench`` (the engine offline) and ``mtpserve bench-serve`` (any OpenAI-compatible
server over HTTP)."""
