"""Counter-based noise: the tensor hash against its Python-int reference, the distribution of the numbers it
gives (chi-square / Kolmogorov-Smirnov from scipy), and what the keys depend on."""

import torch
from scipy import stats

from mtpserve.engine.noise import ACCEPT, DRAFT, TOKEN, RequestNoise, exponentials, hashes, keys, mix32, uniforms


def test_tensor_hash_matches_python_reference():
    values = [0, 1, 2, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9, 123456789]
    key_pairs = [keys(7, 3, TOKEN), keys(-(2**63), 2**31, DRAFT)]
    got = hashes(key_pairs, torch.tensor(values)).tolist()
    for row, (a, b) in enumerate(key_pairs):
        assert got[row] == [mix32(mix32(v ^ a) ^ b) for v in values]


def test_mix32_is_a_bijection_on_a_sample():
    sample = range(0, 2**32, 2**32 // 100_003)
    assert len({mix32(v) for v in sample}) == len(sample)


def test_exponentials_are_exp1():
    # one row per position of one request: the numbers the sampler uses at successive positions
    race = exponentials([RequestNoise(1)] * 40, list(range(40)), TOKEN, 1000, "cpu").double().flatten()
    assert race.min() > 0
    assert stats.kstest(race.numpy(), "expon").pvalue > 1e-3


def test_uniforms_are_uniform_and_streams_differ():
    noise = [RequestNoise(5)] * 20_000
    u = uniforms(noise, list(range(20_000)), ACCEPT, "cpu")
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    v = uniforms(noise, list(range(20_000)), DRAFT, "cpu")
    assert abs(stats.pearsonr(u.numpy(), v.numpy())[0]) < 0.03


def test_keys_depend_on_seed_position_and_stream_only():
    a = exponentials([RequestNoise(9), RequestNoise(9, seeded=False)], [4, 4], TOKEN, 64, "cpu")
    assert torch.equal(a[0], a[1])  # the flag says where the seed came from, not what it gives
    others = [(10, 4, TOKEN), (9, 5, TOKEN), (9, 4, DRAFT), (9 + 2**32, 4, TOKEN)]
    for seed, position, stream in others:
        b = exponentials([RequestNoise(seed)], [position], stream, 64, "cpu")
        assert not torch.equal(a[0], b[0])


def test_unseeded_requests_draw_fresh_seeds():
    assert RequestNoise.of(3) == RequestNoise(3, seeded=True)
    first, second = RequestNoise.of(None), RequestNoise.of(None)
    assert not first.seeded and first.seed != second.seed
