"""The attention backend chosen at start-up, and the whole tiny engine on the Triton backend (under
Triton's interpreter on CPU): the same greedy tokens as on the torch reference backend, with and
without MTP drafts (whose draft steps attend through the same backend)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy, make_engine
from mtp_helpers import save_random_head

from mtpserve.engine.attention_backend import resolve_attention_backend
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader import load_checkpoint

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# lengths around the block size (4) and a prompt over the interpreter-friendly tile
PROMPTS = [[3, 17, 5, 9, 11, 2, 8, 30, 4], [7, 7, 1], [5, 8, 13, 21, 34, 55, 89, 144, 233, 12, 6, 2, 19, 3,
                                                       40, 41, 42, 43, 44, 45]]


def test_auto_is_torch_on_cpu_and_for_float64():
    assert resolve_attention_backend("auto", CPU, torch.float32) == "torch"
    assert resolve_attention_backend("auto", CUDA, torch.float64) == "torch"
    assert resolve_attention_backend("torch", CUDA, torch.bfloat16) == "torch"


def test_auto_is_triton_on_cuda():
    pytest.importorskip("triton")
    assert resolve_attention_backend("auto", CUDA, torch.bfloat16) == "triton"


def test_forced_triton_that_cannot_run_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    with pytest.raises(MtpserveError, match="float64"):
        resolve_attention_backend("triton", CUDA, torch.float64)
    import mtpserve.kernels.triton_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(MtpserveError, match="TRITON_INTERPRET"):
        resolve_attention_backend("triton", CPU, torch.float32)
    with pytest.raises(MtpserveError, match="one of"):
        resolve_attention_backend("flash", CPU, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA runs are in tests/test_gpu_graphs.py")
@pytest.mark.parametrize("mtp", [False, True])
def test_engine_on_triton_matches_torch(tiny_llama_dir, tmp_path, mtp):
    pytest.importorskip("triton")
    config = dict(spec_draft_n_max=0)
    if mtp:  # a random head: drafts mostly rejected, so verify rows and their rollback both run
        head = save_random_head(tmp_path / "head", load_checkpoint(tiny_llama_dir).config)
        config = dict(mtp_head=head, spec_draft_n_max=3, spec_adaptive=False)
    reference = make_engine(tiny_llama_dir, attention_backend="torch", **config)
    engine = make_engine(tiny_llama_dir, attention_backend="triton", **config)
    assert "attention triton" in engine.summary()
    assert "attention torch" in reference.summary()
    assert greedy(engine, PROMPTS, 6) == greedy(reference, PROMPTS, 6)
    if mtp:
        assert engine.spec_stats.num_draft_tokens > 0
