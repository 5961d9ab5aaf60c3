"""Rotary position embeddings:
frequency tables (default, linear, llama3, yarn) and their application."""

from __future__ import annotations

import math

import torch


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    rotary_dim: int, base: float, s: dict, max_pos: int
) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings") or max_pos
    beta_fast = s.get("beta_fast", 32.0)
    beta_slow = s.get("beta_slow", 1.0)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            mscale = _yarn_mscale(factor, s["mscale"])
            attention_factor = mscale / _yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = _yarn_mscale(factor)

    def dim_of(rotations: float) -> float:
        return (rotary_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def rope_cos_sin(rotary_dim: int, base: float, max_positions: int, scaling: dict | None,
                 max_position_embeddings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, rotary_dim // 2] in float64."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    attention_factor = 1.0
    kind = (scaling or {}).get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        yarn = _yarn_inv_freq(rotary_dim, base, scaling, max_position_embeddings)
        inv_freq, attention_factor = yarn
    elif kind is not None:
        raise ValueError(f"unsupported rope type {kind!r}")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def signed_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The half tables of ``rope_cos_sin`` widened for ``apply_rotary``: ``[cos, cos]`` and
    ``[-sin, sin]``, ``[max_positions, rotary_dim]``."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX/HF) rotary on the first ``cos.shape[-1]`` dims, in four ops:
    ``x * cos + swap_halves(x) * sin`` with the ``signed_tables`` rows of the tokens' positions.

    x: [T, heads, head_dim]; cos, sin: [T, rotary_dim].
    """
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    rot = x[..., :rotary_dim]
    swapped = torch.cat((rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos.unsqueeze(1) + swapped * sin.unsqueeze(1)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)
