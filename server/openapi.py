"""The OpenAPI document as the server really answers: every error is the OpenAI envelope (declared
as the ``default`` response of every route; FastAPI's 422 validation schema is dropped, validation
errors are 400s), completions stream as text/event-stream and /metrics is text."""

from __future__ import annotations

from mtpserve.server.protocol import ErrorResponse

ERRORS = {"default": {"model": ErrorResponse, "description": "an error, in the OpenAI envelope"}}
# one server-sent event of a stream (OpenAPI before 3.2: a stream's ``schema`` describes each event)
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
STREAMS = {
    200: {
        "content": {"application/json": {}, "text/event-stream": {"schema": SSE_EVENT}},
        "description": "a completion, or its stream of chunks when 'stream' is true",
    },
}


def drop_validation_schema(app) -> None:
    """Wrap ``app.openapi`` so the generated document has no 422 responses."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = generate()
            for operations in doc["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
