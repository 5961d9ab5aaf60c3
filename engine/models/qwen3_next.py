"""Qwen3-Next (transformers ``qwen3_next``) and Qwen3.5 (``qwen3_5_text``, ``qwen3_5_moe_text``):
hybrid decoders. Most layers mix tokens with Gated DeltaNet, a linear attention whose memory is a
recurrent state per request (no KV cache); every few layers (``layer_types``) use gated full
attention over the paged KV cache. MoE blocks route with a softmax and add a gated shared expert
(Qwen3.5 dense: MLPs only). Qwen3.5 is the same model with the DeltaNet input projections stored
apart.

- RMSNorms are zero-centered (scale ``1 + w``, also q/k norms and the MTP norms): stored as
  ``1 + w`` at load, so ``kernels/rmsnorm.py`` applies them. The DeltaNet output norm is a plain
  RMSNorm gated by ``silu(z)``.
- Gated attention: ``q_proj`` yields ``[query, gate]`` per head; q/k RMSNorm, partial rotary, the
  attention output times ``sigmoid(gate)``.
- Gated DeltaNet: ``[q, k, v]`` through a causal depthwise convolution (SiLU), q/k L2-normalized,
  decay ``g = -exp(A_log) * softplus(a + dt_bias)``, write strength ``beta = sigmoid(b)``, the
  delta rule of ``kernels/gated_delta.py`` (each key head serves ``Hv / Hk`` value heads), then
  ``norm(o) * silu(z)``. Its conv inputs and states live in the engine's per-request slots
  (``engine/recurrent_state.py``), reached through ``attn.meta.recurrent``; without them
  (training, offline scoring) each sequence starts from zeros.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mtpserve.engine.config import ModelConfig
from mtpserve.engine.models.glm4_moe import RoutedExperts
from mtpserve.engine.models.llama import (
    MLP,
    Attention,
    DecoderLayer,
    LlamaForCausalLM,
    _copy,
    _param,
    _take,
)
from mtpserve.kernels.gated_delta import (
    causal_conv1d,
    delta_rule_chunked,
    delta_rule_recurrent,
    l2_normalize,
)
from mtpserve.kernels.linear import linear
from mtpserve.kernels.rmsnorm import rms_norm
from mtpserve.kernels.rotary import apply_rotary

# sequences up to this many tokens (decode, verification) run the delta rule token by token
RECURRENT_MAX_LEN = 16


def _shift_norms(*params: nn.Parameter) -> None:
    """Zero-centered RMSNorm weights w -> 1 + w (a new tensor: the checkpoint's stays as it was)."""
    for p in params:
        p.data = p.data + 1.0


class GatedAttention(Attention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # q_proj yields [query, gate] per head; the layer's load and export split at q_size
        self.q_size *= 2
        self.qkv_weight = _param(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.qkv_bias = _param(self.q_size + 2 * self.kv_size) if cfg.attention_bias else None

    def forward(self, x, cos, sin, kv_cache, attn):
        t = x.shape[0]
        qkv = linear(x, self.qkv_weight, self.qkv_bias)
        qg, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q, gate = qg.view(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = rms_norm(q, self.q_norm, self.eps)
        k = rms_norm(k.view(t, self.num_kv_heads, self.head_dim), self.k_norm, self.eps)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = attn.forward(q, k, v, kv_cache, self.scale)
        out = out * torch.sigmoid(gate)
        return linear(out.reshape(t, -1), self.o_weight, self.o_bias)


class GatedDeltaNet(nn.Module):
    LINEAR_WEIGHTS = ("in_proj", "out_proj")

    def __init__(self, cfg: ModelConfig, state_index: int):
        super().__init__()
        self.state_index = state_index  # this layer's place in the engine's recurrent state tensors
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.head_k_dim = cfg.linear_key_head_dim
        self.head_v_dim = cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        # [in, out] columns: q, k, v (all heads in order) | z | b | a
        proj_size = self.conv_dim + self.value_dim + 2 * self.num_v_heads
        self.in_proj = _param(cfg.hidden_size, proj_size)
        self.conv_weight = _param(self.conv_dim, self.kernel_size)
        self.dt_bias = _param(self.num_v_heads)
        self.A_log = _param(self.num_v_heads)
        self.norm = _param(self.head_v_dim)
        self.out_proj = _param(self.value_dim, cfg.hidden_size)
        self.eps = cfg.rms_norm_eps

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """(conv context [K - 1, conv_dim], recurrent state [Hv, Dk, Dv]) of one request."""
        conv = (self.kernel_size - 1, self.conv_dim)
        recurrent = (self.num_v_heads, self.head_k_dim, self.head_v_dim)
        return conv, recurrent

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """Qwen3-Next packs ``in_proj_qkvz`` / ``in_proj_ba`` per key head ([q, k, v, z] and [b, a]
        of the value heads it serves); Qwen3.5 stores ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
        ``in_proj_a`` apart."""
        def g(name: str) -> torch.Tensor:
            return _take(w, prefix + name)

        if prefix + "in_proj_qkvz.weight" in w:
            hk = self.num_k_heads
            r = self.num_v_heads // self.num_k_heads
            dk = self.head_k_dim
            dv = self.head_v_dim
            qkvz = g("in_proj_qkvz.weight").reshape(hk, 2 * dk + 2 * r * dv, -1)
            qkvz = qkvz.split([dk, dk, r * dv, r * dv], 1)
            b, a = g("in_proj_ba.weight").reshape(hk, 2 * r, -1).split([r, r], 1)
            parts = [p.reshape(-1, p.shape[-1]) for p in (*qkvz, b, a)]
        else:
            parts = [g(f"in_proj_{p}.weight") for p in ("qkv", "z", "b", "a")]
        _copy(self.in_proj, torch.cat(parts).t())
        _copy(self.conv_weight, g("conv1d.weight").reshape(self.conv_dim, self.kernel_size))
        _copy(self.dt_bias, g("dt_bias"))
        _copy(self.A_log, g("A_log"))
        _copy(self.norm, g("norm.weight"))
        _copy(self.out_proj, g("out_proj.weight").t())

    def forward(self, x: torch.Tensor, attn) -> torch.Tensor:
        t = x.shape[0]
        hv = self.num_v_heads
        projected = linear(x, self.in_proj)
        mixed, z, b, a = projected.split([self.conv_dim, self.value_dim, hv, hv], dim=-1)
        meta = attn.meta
        step = meta.recurrent if meta is not None else None
        lens = [t]
        starts = [0, t]
        if meta is not None:
            lens = meta.query_lens
            starts = meta.token_starts()
        state_dtype = torch.promote_types(x.dtype, torch.float32)
        if step is not None:
            context, state = step.read_state(self.state_index)
            save = step.save
        else:  # no engine state: every sequence starts from zeros and nothing is kept
            (ctx_len, _), ssm = self.state_shapes()
            context = x.new_zeros(len(lens), ctx_len, self.conv_dim)
            state = torch.zeros(len(lens), *ssm, dtype=state_dtype, device=x.device)
            save = [1] * len(lens)
        groups = _by_length(lens, starts, x.device)
        conv = torch.empty_like(mixed)
        for n, rows, tokens in groups:
            seqs = mixed[tokens].view(len(rows), n, -1)
            convolved = causal_conv1d(seqs, context[rows], self.conv_weight)
            conv[tokens] = convolved.reshape(-1, self.conv_dim)
        q, k, v = conv.to(state_dtype).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = hv // self.num_k_heads
        q = l2_normalize(q.view(t, self.num_k_heads, -1)).repeat_interleave(r, 1)
        q = q * self.head_k_dim ** -0.5
        k = l2_normalize(k.view(t, self.num_k_heads, -1)).repeat_interleave(r, 1)
        v = v.view(t, hv, self.head_v_dim)
        beta = torch.sigmoid(b.to(state_dtype))
        g = -self.A_log.to(state_dtype).exp() * F.softplus(a.to(state_dtype) + self.dt_bias)
        out = torch.empty_like(v)
        for n, rows, tokens in groups:
            shaped = [u[tokens].view(len(rows), n, *u.shape[1:]) for u in (q, k, v, g, beta)]
            keep = [save[i] for i in rows]
            if n <= RECURRENT_MAX_LEN or max(keep) > 1:
                o, states = delta_rule_recurrent(*shaped, state[rows])
                kept = [states[j, n - keep[j]:] for j in range(len(rows))]
            else:
                o, final = delta_rule_chunked(*shaped, state[rows])
                kept = list(final[:, None])
            out[tokens] = o.reshape(-1, hv, self.head_v_dim)
            if step is not None:
                inputs = mixed[tokens].view(len(rows), n, -1)
                for j, i in enumerate(rows):
                    step.write(self.state_index, i, inputs[j], kept[j])
        gate = F.silu(z.view(t, hv, self.head_v_dim))
        out = rms_norm(out.to(x.dtype), self.norm, self.eps) * gate
        return linear(out.reshape(t, self.value_dim), self.out_proj)


def _by_length(
    lens: list[int], starts: list[int], device
) -> list[tuple[int, list[int], torch.Tensor]]:
    """Sequences grouped by length: (length, sequence indices, their token indices in the flattened
    step); ``starts``: where each sequence's tokens start."""
    groups = {}
    for i, n in enumerate(lens):
        if n:
            groups.setdefault(n, []).append(i)
    out = []
    for n, rows in groups.items():
        tokens = torch.cat([torch.arange(starts[i], starts[i] + n, device=device) for i in rows])
        out.append((n, rows, tokens))
    return out


class SparseMoE(RoutedExperts):
    """Softmax router over ``n_routed_experts``, top-k (renormalized when ``norm_topk_prob``), plus
    one shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate_weight = _param(cfg.hidden_size, cfg.n_routed_experts)  # [in, out]
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(replace(cfg, intermediate_size=shared)) if shared else None
        self.shared_gate = _param(cfg.hidden_size, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = linear(x, self.gate_weight).float().softmax(-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = self.run_experts(x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(linear(x, self.shared_gate)) * self.shared_expert(x)
        return out

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        _copy(self.gate_weight, _take(w, prefix + "gate.weight").t())
        self.load_experts(w, prefix)
        if self.shared_expert is not None:
            self.shared_expert.load(w, prefix + "shared_expert.")
            _copy(self.shared_gate, _take(w, prefix + "shared_expert_gate.weight").t())


class Qwen3NextDecoderLayer(DecoderLayer):
    """Gated attention or Gated DeltaNet (``linear_attn``), then a dense MLP or the MoE block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, state_index: int | None):
        super().__init__(cfg)
        self.linear_attn = GatedDeltaNet(cfg, state_index) if state_index is not None else None
        self.self_attn = GatedAttention(cfg) if state_index is None else None
        if self.has_experts(cfg, layer_idx):
            self.mlp = SparseMoE(cfg)

    @staticmethod
    def has_experts(cfg: ModelConfig, layer_idx: int) -> bool:
        if cfg.n_routed_experts <= 0:
            return False
        if layer_idx >= cfg.num_hidden_layers:  # an MTP block has experts whenever the model does
            return True
        if layer_idx in cfg.mlp_only_layers:
            return False
        return (layer_idx + 1) % cfg.decoder_sparse_step == 0

    def forward(self, x, cos, sin, kv_cache, attn):
        h = rms_norm(x, self.input_norm, self.eps)
        if self.self_attn is None:
            x = x + self.linear_attn(h, attn)
        else:
            x = x + self.self_attn(h, cos, sin, kv_cache, attn)
        return x + self.mlp(rms_norm(x, self.post_attention_norm, self.eps))

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        if self.self_attn is not None:
            super().load(w, prefix)
            _shift_norms(self.self_attn.q_norm, self.self_attn.k_norm)
        else:
            _copy(self.input_norm, _take(w, prefix + "input_layernorm.weight"))
            _copy(self.post_attention_norm, _take(w, prefix + "post_attention_layernorm.weight"))
            self.linear_attn.load(w, prefix + "linear_attn.")
            self.mlp.load(w, prefix + "mlp.")
        _shift_norms(self.input_norm, self.post_attention_norm)


class Qwen3NextForCausalLM(LlamaForCausalLM):
    """Same interface as LlamaForCausalLM; ``layer_types`` picks each layer's token mixer."""

    FUSED_LAYERS = False  # MoE and linear-attention layers
    CUDA_GRAPHS = False  # MoE routing on the host, and recurrent state slots per step

    def make_layer(self, layer_idx: int) -> Qwen3NextDecoderLayer:
        cfg = self.config
        linear_attn = not cfg.has_kv(layer_idx)
        state_index = None
        if linear_attn:
            state_index = cfg.layer_types[:layer_idx].count("linear_attention")
        return Qwen3NextDecoderLayer(cfg, layer_idx, state_index)

    def load_weights(self, w: dict[str, torch.Tensor]) -> None:
        super().load_weights(w)
        _shift_norms(self.norm)

    def linear_attention_layers(self) -> list[GatedDeltaNet]:
        """The Gated DeltaNet layers, in the order of their ``state_index``."""
        return [layer.linear_attn for layer in self.layers if layer.linear_attn is not None]
