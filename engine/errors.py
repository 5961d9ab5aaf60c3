"""Errors the engine raises for things a user can fix (shown without a traceback)."""


class MtpserveError(Exception):
    """Base class: the message is meant for the user as is."""


class ModelLoadError(MtpserveError):
    """A model could not be loaded: missing/corrupt file,
    unsupported architecture or quantization."""


class RequestError(MtpserveError):
    """A request is invalid for this engine (e.g. prompt longer than the context)."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
