"""Serve an app with uvicorn on loopback from a
background thread (the stress command and the tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1", timeout: float = 30.0):
    """Yield the base URL of ``app`` served on a free port of ``host``; stop the server on exit."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http="h11"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                              daemon=True)
    thread.start()
    deadline = time.perf_counter() + timeout
    while not server.started and thread.is_alive() and time.perf_counter() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
