"""Benchmarks and load: the engine offline (``mtpserve bench``), any OpenAI-compatible server over
HTTP (``mtpserve bench-serve``), and the load generator of ``mtpserve stress`` and the reliability
tests. The command-line options live in cli/."""
