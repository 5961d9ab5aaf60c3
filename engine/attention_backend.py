"""Which attention backend an engine runs, chosen once at start-up: the Triton kernels on CUDA, the
PyTorch reference (gather + SDPA) on CPU and for float64; ``--attention-backend`` forces one."""

from __future__ import annotations

import importlib.util
import logging

import torch

from mtpserve.engine.errors import MtpserveError
from mtpserve.kernels.attention import AttentionBackend, TorchPagedAttention

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "triton")
# the activation dtypes of the Triton kernels (float64 runs on the torch backend)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: triton on CUDA (when installed, for its dtypes), torch elsewhere. A forced
    ``triton`` that cannot run here is an error, never a silent fallback."""
    if name not in ATTENTION_BACKENDS:
        raise MtpserveError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                            f"not {name!r}")
    on_cuda = device.type == "cuda"
    if name == "auto":
        if not on_cuda or dtype not in TRITON_DTYPES:
            return "torch"
        if not triton_installed():
            logger.warning("triton is not installed: attention runs on the torch reference "
                           "backend (pip install triton for the CUDA kernels)")
            return "torch"
        return "triton"
    if name == "triton":
        _check_triton(on_cuda, dtype)
    return name


def _check_triton(on_cuda: bool, dtype: torch.dtype) -> None:
    if not triton_installed():
        raise MtpserveError("--attention-backend triton needs triton (pip install triton)")
    if dtype not in TRITON_DTYPES:
        raise MtpserveError(f"--attention-backend triton runs float32, bfloat16 and float16, not "
                            f"{str(dtype).removeprefix('torch.')}; use --attention-backend torch")
    from mtpserve.kernels.triton_attention import INTERPRETED

    if not on_cuda and not INTERPRETED:
        raise MtpserveError("--attention-backend triton runs on CUDA; on CPU only under Triton's "
                            "interpreter (TRITON_INTERPRET=1, slow: for tests)")


def make_attention_backend(name: str) -> AttentionBackend:
    """A fresh backend of a resolved name (each user keeps its own step metadata)."""
    if name == "triton":
        from mtpserve.kernels.triton_backend import TritonPagedAttention

        return TritonPagedAttention()
    return TorchPagedAttention()
