"""mtpserve: an OpenAI-compatible inference server built around Multi-Token Prediction."""

__version__ = "0.1.0"
