"""Helpers for tests that run ``mtpserve serve`` as a separate process."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx


def start_server(config_path, log_path, *options, cwd=None) -> subprocess.Popen:
    """``mtpserve [options] serve --config CONFIG``, output appended to ``log_path``."""
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, "-m", "mtpserve.cli.main", *options, "serve", "--config",
                                 str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll /health until 200; AssertionError if the process exits or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"server not healthy (exit code {proc.poll()})")
