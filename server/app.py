"""The FastAPI app: its state, routes, middlewares and error handlers (routes.py; bodies:
responses.py; errors: errors.py; auth and limits: pure ASGI middlewares of their own)."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from mtpserve import __version__
from mtpserve.server.access import AccessLog
from mtpserve.server.auth import APIKeyAuth
from mtpserve.server.chat_prompt import ServerChatSettings
from mtpserve.server.client_limit import ClientLimit
from mtpserve.server.errors import add_error_handlers
from mtpserve.server.metrics import ServerMetrics
from mtpserve.server.openapi import ERRORS, drop_validation_schema
from mtpserve.server.routes import router
from mtpserve.server.size_limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, SizeLimits


def build_app(engine_client, served_model_name: str, api_key: str | None = None,
              max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, metrics_public: bool = False,
              max_concurrent_per_client: int | None = None, log_prompts: bool = False,
              chat_settings: ServerChatSettings | None = None,
              sse_keepalive: float = 15.0,
              allowed_origins: list[str] | None = None) -> FastAPI:
    # the routes are given, not included: FastAPI keeps an included router as one entry of
    # app.routes
    app = FastAPI(title="mtpserve", version=__version__, responses=ERRORS, routes=router.routes)
    drop_validation_schema(app)
    app.state.client = engine_client
    app.state.served_model_name = served_model_name
    app.state.metrics = ServerMetrics(served_model_name)
    app.state.max_queue = max_queue
    app.state.log_prompts = log_prompts
    app.state.chat_settings = chat_settings or ServerChatSettings()
    app.state.sse_keepalive = sse_keepalive
    # added innermost first; a request goes through the access log, CORS, size limits, the API
    # key, the per-client limit, then the routes
    if max_concurrent_per_client is not None:
        app.add_middleware(ClientLimit, limit=max_concurrent_per_client)
    if api_key:
        public_paths = ("/health",)
        if metrics_public:
            public_paths = ("/health", "/metrics")
        app.add_middleware(APIKeyAuth, api_key=api_key, public_paths=public_paths)
    app.add_middleware(SizeLimits, max_body_bytes=max_body_bytes, max_header_bytes=max_header_bytes)
    if allowed_origins:  # outside the API key: a browser's preflight carries none
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    paths = [route.path for route in app.routes]
    app.add_middleware(AccessLog, metrics=app.state.metrics, paths=paths)
    add_error_handlers(app)
    return app
