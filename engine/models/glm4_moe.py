"""GLM-4.5 family (transformers ``glm4_moe``): the Llama block with partial rotary, q/k/v bias (none
on o_proj), optional q/k norm, and a mixture of experts in every layer from
``first_k_dense_replace`` on.

Routing (as transformers and the reference release): sigmoid scores; ``e_score_correction_bias`` is
added for choosing experts only (group-limited: keep the ``topk_group`` groups whose two best biased
scores sum highest, then the top ``num_experts_per_tok`` experts among them); the chosen experts are
weighted by their unbiased scores, renormalized when ``norm_topk_prob``, times
``routed_scaling_factor``. Shared experts see every token. The router stays in float32 whatever the
runtime dtype, as in transformers and vLLM.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mtpserve.engine.config import ModelConfig
from mtpserve.engine.models.llama import (
    MLP,
    Attention,
    DecoderLayer,
    LlamaForCausalLM,
    _copy,
    _param,
    _take,
)
from mtpserve.kernels.linear import linear


class Glm4Attention(Attention):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.o_bias = None  # attention_bias covers q/k/v only


class RoutedExperts(nn.Module):
    """Expert weights (per expert ``[in, out]``) and
    the routed sum ``sum_j w_j expert_{id_j}(x)``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_weight = _param(num_experts, hidden_size, 2 * intermediate_size)
        self.down_weight = _param(num_experts, intermediate_size, hidden_size)

    def run_experts(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H], ids / weights [T, top_k] -> [T, H]."""
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():  # only the experts that got tokens
            tokens, slot = (ids == e).nonzero(as_tuple=True)
            gate, up = linear(x[tokens], self.gate_up_weight[e]).chunk(2, dim=-1)
            y = linear(F.silu(gate) * up, self.down_weight[e])
            out.index_add_(0, tokens, y * weights[tokens, slot, None].to(y.dtype))
        return out

    def load_experts(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """``{prefix}experts.{e}.{gate,up,down}_proj.weight``, or the fused ``experts.gate_up_proj``
        [E, 2I, H] and ``experts.down_proj`` [E, H, I] of transformers' own layout."""
        if prefix + "experts.gate_up_proj" in w:
            _copy(self.gate_up_weight, w[prefix + "experts.gate_up_proj"].transpose(1, 2))
            _copy(self.down_weight, _take(w, prefix + "experts.down_proj").transpose(1, 2))
            return
        experts = [f"{prefix}experts.{e}." for e in range(self.num_experts)]
        gate_up = []
        for e in experts:
            gate = _take(w, e + "gate_proj.weight")
            up = _take(w, e + "up_proj.weight")
            gate_up.append(torch.cat([gate, up]).t())
        _copy(self.gate_up_weight, torch.stack(gate_up))
        down = [_take(w, e + "down_proj.weight").t() for e in experts]
        _copy(self.down_weight, torch.stack(down))


class MoE(RoutedExperts):
    def __init__(self, cfg: ModelConfig):
        h = cfg.hidden_size
        inter = cfg.moe_intermediate_size
        n = cfg.n_routed_experts
        super().__init__(n, h, inter)
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.gate_weight = _param(h, n)  # [in, out], float32
        self.gate_bias = _param(n)  # e_score_correction_bias: expert choice only
        self.shared_experts = None
        if cfg.n_shared_experts:
            shared_size = inter * cfg.n_shared_experts
            self.shared_experts = MLP(replace(cfg, intermediate_size=shared_size))

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` casts everything but the router,
        which keeps float32 (only its device follows)."""
        router = {"gate_weight": self.gate_weight.data, "gate_bias": self.gate_bias.data}
        super()._apply(fn, recurse)
        for name, value in router.items():
            getattr(self, name).data = value.to(fn(value[:0]).device, torch.float32)
        return self

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids [T, top_k], weights [T, top_k] float32)."""
        scores = linear(x.float(), self.gate_weight).sigmoid()
        choice = scores + self.gate_bias
        if self.n_group > 1:
            t = x.shape[0]
            grouped = choice.view(t, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~mask[..., None], float("-inf")).view(t, -1)
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run_experts(x, *self.route(x))
        if self.shared_experts is None:
            return out
        return out + self.shared_experts(x)

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """From the checkpoint layout: ``{prefix}gate.weight``, ``gate.e_score_correction_bias``,
        ``experts.{e}.{gate,up,down}_proj.weight``, ``shared_experts.*``."""
        _copy(self.gate_weight, _take(w, prefix + "gate.weight").float().t())
        _copy(self.gate_bias, _take(w, prefix + "gate.e_score_correction_bias").float())
        self.load_experts(w, prefix)
        if self.shared_experts is not None:
            self.shared_experts.load(w, prefix + "shared_experts.")


class Glm4MoeDecoderLayer(DecoderLayer):
    """The Llama block with GLM attention; ``moe`` swaps the dense MLP for experts."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__(cfg)
        self.self_attn = Glm4Attention(cfg)
        if moe:
            self.mlp = MoE(cfg)


class Glm4MoeForCausalLM(LlamaForCausalLM):
    """Same interface as LlamaForCausalLM;
    layers from ``first_k_dense_replace`` on (and MTP layers) are MoE."""

    FUSED_LAYERS = False  # MoE layers
    CUDA_GRAPHS = False  # the routing picks experts on the host

    def make_layer(self, layer_idx: int) -> Glm4MoeDecoderLayer:
        """Block ``layer_idx``;
        an MTP layer (index >= num_hidden_layers) always has experts, as in transformers."""
        cfg = self.config
        sparse = layer_idx >= cfg.first_k_dense_replace or layer_idx >= cfg.num_hidden_layers
        moe = cfg.n_routed_experts > 0 and sparse
        return Glm4MoeDecoderLayer(cfg, moe)
