"""Random-weight models of a given shape (``mtpserve bench --random-weights``) and the decode-speed
measurement's bookkeeping: the presets have the published parameter counts, the engine decodes
every request in every timed step, and the HBM bound is the bytes arithmetic done by hand. No
timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from mtpserve.bench import decode_speed
from mtpserve.bench.random_model import model_config_of, preset_names, random_engine
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.models import model_class

TINY = """
model_type: llama
vocab_size: 96
hidden_size: 32
intermediate_size: 64
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
head_dim: 8
max_position_embeddings: 128
tie_word_embeddings: false
"""


@pytest.mark.parametrize("name,count", [
    ("llama-1b", 1_235_814_400),  # Llama 3.2 1B
    ("llama-8b", 8_030_261_248),  # Llama 3.1 8B
])
def test_presets_have_the_published_sizes(name, count):
    assert name in preset_names()
    config = model_config_of(name)
    with torch.device("meta"):
        model = model_class(config.architecture)(config, 16)
    assert sum(p.numel() for p in model.parameters()) == count


def test_unknown_shape_is_an_error():
    with pytest.raises(MtpserveError, match="llama-8b"):
        model_config_of("llama-70b")


@pytest.fixture
def tiny_shape(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def test_random_engine_decodes_every_request_each_step(tiny_shape):
    config = decode_speed.engine_config([1, 3], prompt_len=5, steps=4, block_size=4)
    engine = random_engine(tiny_shape, config)
    assert engine.mtp is None
    model = engine.model
    assert torch.equal(model.norm, torch.ones(32))
    assert model.lm_head.dtype == torch.float32
    assert 0.01 < model.lm_head.std().item() < 0.03
    row = decode_speed.decode(engine, 3, prompt_len=5, steps=4)
    assert row["tokens"] == 3 * 4
    # each request's context: 5 prompt tokens, then one per step (first token, warm-up, timed)
    first = 3 * (5 + 1 + decode_speed.WARMUP_STEPS - 1)
    assert row["mean_context_tokens"] == first + 3 * 4 / 2
    assert not engine.requests  # aborted: the next batch size starts from an empty engine


def test_bound_is_bytes_over_bandwidth(tiny_shape):
    engine = random_engine(tiny_shape, decode_speed.engine_config([1], 4, 2, block_size=4))
    # every matrix but the [96, 32] embedding table, float32: by hand from the shape
    layer = 32 * (32 + 2 * 16) + 32 * 32 + 32 * 2 * 64 + 64 * 32 + 2 * 32
    assert decode_speed.weight_bytes(engine.model) == 4 * (2 * layer + 32 + 32 * 96)
    per_token = decode_speed.kv_bytes_per_token(engine)
    assert per_token == 2 * 2 * 2 * 8 * 4  # layers x (K, V) x kv heads x head_dim x float32
    row = decode_speed.with_bound({"batch_size": 8, "tok_s": 500.0, "mean_context_tokens": 100},
                                  weights=1000, kv_per_token=10, bandwidth=4000.0)
    assert row["step_bytes"] == 2000
    assert row["bound_tok_s"] == 8 * 4000.0 / 2000
    assert row["ratio_to_bound"] == 500.0 / 16.0


def test_bench_random_weights_writes_the_rows(tiny_shape, tmp_path):
    from mtpserve.cli.main import main

    out = tmp_path / "out"
    argv = ["bench", "--random-weights", tiny_shape, "--device", "cpu", "--batch-sizes", "2,1",
            "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["batch_size"] for row in results["rows"]] == [2, 1]
    for row in results["rows"]:
        assert row["tokens"] == row["batch_size"] * decode_speed.STEPS
    assert "| batch | tok/s |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--random-weights", "llama-1b", "--sections", "decode"], "decode speed only"),
    (["--random-weights", "llama-1b", "--model", "x.gguf"], "leave out --model"),
    (["--random-weights", "llama-1b", "--quantization", "int4"], "float weights"),
    (["--random-weights", "llama-1b", "--mtp-head", "h"], "without MTP"),
    (["--batch-sizes", "1,8"], "goes with --random-weights"),
])
def test_bench_random_weights_rejects_other_options(tmp_path, capsys, argv, message):
    from mtpserve.cli.main import main

    assert main(["bench", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
