"""Builds the CPU kernels (kernels/cpu/*.cpp: the block kernels, attention, the MTP draft loop, the
sampling race) into one library at first use and loads it with ctypes.

The shared library is compiled once per source version into the user's cache directory
(``$XDG_CACHE_HOME/mtpserve``, else ``~/.cache/mtpserve``; a temporary directory where that is not
writable), a few seconds with g++; later starts load it. It is linked with OpenMP and so shares
the OpenMP runtime PyTorch has already loaded (one thread pool, no oversubscription). Needs a C++
compiler and an AVX2 CPU; without them the packed weights and the sampling race fall back to
PyTorch, with the reason logged once. ``--no-cpu-kernels`` leaves the weights to PyTorch.

Where the CPU has them, the build adds AVX-512 with VNNI (two blocks per instruction in the block
kernels), else AVX-VNNI (one ``dpbusd`` for AVX2's two multiplies; the same integers): see
``isa_flags``. ``--cpu-isa avx2`` (``choose_isa``) keeps to AVX2, to compare the builds on one machine.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "cpu" / name
           for name in ("blocks.cpp", "attention.cpp", "draft.cpp", "race.cpp")]
HEADERS = [Path(__file__).parent / "cpu" / "blocks.h"]
FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
AVX512_VNNI = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # as /proc/cpuinfo names them
AVX512_VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
AVX_VNNI_FLAGS = ["-mavxvnni"]

ISA_CHOICES = ("auto", "avx2")

_library: ctypes.CDLL | None = None
_reason: str | None = None
_isa_choice = "auto"


def cache_dir() -> Path:
    """Where built kernels are kept: the user's cache directory if it can be written."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "mtpserve" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"mtpserve-{os.getuid()}" / "kernels"
        path.mkdir(parents=True, exist_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the reason logged once)."""
    global _library, _reason
    if _library is not None or _reason is not None:
        return _library
    try:
        _library = _load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = str(e)
        logger.warning("CPU kernels unavailable (%s): packed weights and sampling use PyTorch's",
                       _reason)
    return _library


def cpu_flags() -> set[str]:
    """The instruction set extensions /proc/cpuinfo lists (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_isa(choice: str) -> None:
    """The instruction sets of the kernels this process loads (ISA_CHOICES), before they load."""
    global _isa_choice
    if choice not in ISA_CHOICES:
        raise ValueError(f"the CPU kernels' instruction set is one of {ISA_CHOICES}, not {choice!r}")
    if _library is not None and choice != _isa_choice:
        raise RuntimeError(f"the CPU kernels are already loaded ({_isa_choice}); "
                           f"{choice} needs a new process")
    _isa_choice = choice


def isa_flags(cpu: set[str], choice: str = "auto") -> list[str]:
    """Compiler flags for the extensions beyond AVX2 that the kernels use on this CPU; none for
    ``choice`` avx2."""
    if choice == "avx2":
        return []
    if all(flag in cpu for flag in AVX512_VNNI):
        return AVX512_VNNI_FLAGS
    if "avx_vnni" in cpu:
        return AVX_VNNI_FLAGS
    return []


def _load() -> ctypes.CDLL:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"the CPU lacks AVX2 (PyTorch reports {capability})")
    isa = isa_flags(cpu_flags(), _isa_choice)
    try:
        path = build(isa)
    except RuntimeError as e:
        if not isa:
            raise
        logger.warning("CPU kernels: the %s build failed (%s); using the AVX2 one", " ".join(isa), e)
        path = build([])
    return ctypes.CDLL(str(path))


def build(isa: list[str]) -> Path:
    """The library compiled from the sources with FLAGS and ``isa``, built if not cached yet."""
    flags = FLAGS + isa
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    logger.info("compiling the CPU kernels (once, %s) into %s", " ".join(isa) or "AVX2", target.parent)
    # build beside the target, then rename: concurrent processes never load a partial file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, *(str(path) for path in SOURCES), "-o", partial]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        os.unlink(partial)
        raise RuntimeError(f"compiling the CPU kernels failed: {done.stderr.strip()[-500:]}")
    os.replace(partial, target)
    return target
