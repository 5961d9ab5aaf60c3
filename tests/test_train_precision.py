"""train-head --precision: auto picks bfloat16 only where the hardware multiplies it natively, bfloat16 autocast
really changes the arithmetic (hidden states close to float32's, not equal), and a head trained under it learns."""

from __future__ import annotations

import pytest

from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.train import precision
from mtpserve.engine.train.trainer import HeadTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
    ({"avx2", "avx512f", "avx512_vnni"}, "float32"),
    (set(), "float32"),
])
def test_auto_precision_follows_native_bf16_on_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("float32", "cpu") == "float32"
    assert precision.resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("fp8", "cpu")


def _config(out, precision_name):
    """The recipe of test_train_head's float32 run, whose bar (+0.1 tokens per step) the bfloat16 run must clear."""
    return TrainConfig(out=out, depth=3, draft_vocab=200, epochs=2, tokens_per_step=512, eval_per_kind=4,
                       prompt_mix={"builtin": 1.0}, train_answers=48,
                       train_per_kind={"code": 24, "chat": 8, "json": 8, "math": 8}, eval_every=10,
                       checkpoint_every=100, max_num_seqs=16, precision=precision_name)


def test_bfloat16_hidden_states_are_close_to_float32_but_not_equal(tiny_llama_dir, tmp_path):
    checkpoint = load_checkpoint(tiny_llama_dir)
    record = {"prompt_ids": list(range(5, 40)), "output_ids": list(range(60, 90))}
    states = {}
    for name in ("float32", "bfloat16"):
        trainer = HeadTrainer(checkpoint, _config(str(tmp_path / name), name))
        states[name] = trainer.record_hidden(record).float()
    exact = states["float32"]
    error = (states["bfloat16"] - exact).norm() / exact.norm()
    assert 0 < error < 0.05, error


def test_a_head_trained_in_bfloat16_learns(tiny_llama_dir, tmp_path):
    report = HeadTrainer(load_checkpoint(tiny_llama_dir), _config(str(tmp_path / "h"), "bfloat16")).run()
    assert report["config"]["precision"] == "bfloat16"
    assert report["loss_last"] < report["loss_first"]
    before, after = report["eval_before"], report["eval"]
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.1
