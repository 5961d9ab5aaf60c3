"""Wall time per phase of a ``train-head`` run (generate, hidden, train), added up over every
session that worked on the same ``--out`` and kept in ``phases.json`` there; and the hardware a
run's report names."""

from __future__ import annotations

import json
import os
import platform
import time

import torch

FILE = "phases.json"


class PhaseClock:
    def __init__(self, out: str):
        self.path = os.path.join(out, FILE)
        self.seconds: dict[str, float] = {}
        self.sessions = 0
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                stored = json.load(f)
            self.seconds = stored["seconds"]
            self.sessions = stored["sessions"]
        self.sessions += 1
        self.phase: str | None = None
        self.since = 0.0

    def start(self, phase: str) -> None:
        self.phase = phase
        self.since = time.time()

    def lap(self) -> None:
        """Add the time since the last lap to the current phase, and save."""
        now = time.time()
        self.seconds[self.phase] = round(self.seconds.get(self.phase, 0.0) + now - self.since, 1)
        self.since = now
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seconds": self.seconds, "sessions": self.sessions}, f, indent=1)
        os.replace(tmp, self.path)

    def stop(self) -> None:
        self.lap()
        self.phase = None


def hardware(device) -> str:
    """Where a run's last session ran: the CPU (or GPU) and the PyTorch build."""
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    text = f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, PyTorch {torch.__version__}"
    if str(device).startswith("cuda"):
        text += f", {torch.cuda.get_device_name(device)}"
    return text
