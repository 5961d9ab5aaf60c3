"""MTP layers: a model's own next-next-token predictors, used as the built-in drafter.

One layer (DeepSeek-V3 / GLM-4.5 layout, also our trained heads) computes, for a position ``p``
whose next token ``t[p+1]`` is known::

    x = eh_proj([enorm(embed(t[p+1])), hnorm(h[p])])      # MiMo: [hidden, token] order
    y = decoder_block(x)                                   # its own paged KV, same block tables
    logits = head(shared_norm(y))                          # predicts t[p+2]

``h[p]`` is the main model's final post-norm hidden state; for the next draft step ``y`` is fed back
as ``h`` (or ``shared_norm(y)`` with ``feedback="post_norm"``, as transformers does). The rotary
position of the pair is ``p + 1`` (the token's own position, as in transformers); its KV slot is
``p``'s slot. Several layers chain: layer ``j`` at position ``p`` reads ``(y_{j-1}[p-1], t[p+1])``
and drafts step ``j``; past the last layer, the last one is reused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.models.llama import _copy, _param, _set_linear, _take
from mtpserve.kernels import cpu_draft
from mtpserve.kernels.cpu_decoder import FusedDecoder, layer_fits
from mtpserve.kernels.linear import linear
from mtpserve.kernels.quant import ROW_HEADS
from mtpserve.kernels.rmsnorm import rms_norm


@dataclass(frozen=True)
class MTPLayout:
    """Where a family keeps its MTP weights (names relative to the layer prefix)."""

    enorm: str = "enorm.weight"
    hnorm: str = "hnorm.weight"
    eh_proj: str = "eh_proj.weight"
    shared_norm: str = "shared_head.norm.weight"
    head: str = "shared_head.head.weight"
    embed: str = "embed_tokens.weight"
    hidden_first: bool = False  # projection input order [hnorm(h), enorm(e)]
    block: str = ""  # the decoder block's prefix after the layer's, "{i}" = layer index
    norm_offset: float = 0.0  # 1.0: zero-centered norms stored as w, applied as 1 + w


DEEPSEEK_LAYOUT = MTPLayout()
MIMO_LAYOUT = MTPLayout(
    enorm="token_layernorm.weight",
    hnorm="hidden_layernorm.weight",
    eh_proj="input_proj.weight",
    shared_norm="final_layernorm.weight",
    head="",
    embed="",
    hidden_first=True,
)
# Qwen3-Next / Qwen3.5: one mtp.{fc,pre_fc_norm_*,norm} set, blocks mtp.layers.{i}
QWEN_LAYOUT = MTPLayout(
    enorm="pre_fc_norm_embedding.weight",
    hnorm="pre_fc_norm_hidden.weight",
    eh_proj="fc.weight",
    shared_norm="norm.weight",
    head="",
    embed="",
    block="layers.{i}.",
    norm_offset=1.0,
)


class MTPLayer(nn.Module):
    LINEAR_WEIGHTS = ("eh_proj",)
    HEAD_WEIGHTS = ("head",)

    def __init__(self, block: nn.Module, hidden_size: int, vocab_size: int, eps: float,
                 layout: MTPLayout, feedback: str = "pre_norm"):
        super().__init__()
        if feedback not in ("pre_norm", "post_norm"):
            raise ValueError(f"feedback must be pre_norm or post_norm, not {feedback!r}")
        self.layout = layout
        self.feedback = feedback
        self.eps = eps
        self.enorm = _param(hidden_size)
        self.hnorm = _param(hidden_size)
        self.eh_proj = _param(2 * hidden_size, hidden_size)  # [in, out]
        self.block = block
        self.shared_norm = _param(hidden_size)
        self.register_parameter("head", None)  # own lm_head [hidden, vocab], else the main model's
        self.register_parameter("embed_tokens", None)  # own embedding, else the main model's
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        lay = self.layout
        _copy(self.enorm, _take(w, prefix + lay.enorm) + lay.norm_offset)
        _copy(self.hnorm, _take(w, prefix + lay.hnorm) + lay.norm_offset)
        _set_linear(self, "eh_proj", [_take(w, prefix + lay.eh_proj)])
        _copy(self.shared_norm, _take(w, prefix + lay.shared_norm) + lay.norm_offset)
        if lay.head and prefix + lay.head in w:
            self.head = _param(self.hidden_size, self.vocab_size)
            _set_linear(self, "head", [w[prefix + lay.head]])
        if lay.embed and prefix + lay.embed in w:
            self.embed_tokens = _param(self.vocab_size, self.hidden_size)
            _copy(self.embed_tokens, w[prefix + lay.embed])
        self.block.load(w, prefix + lay.block)

    def export(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF/DeepSeek-named weights of this layer (the inverse of ``load``)."""
        lay = self.layout
        off = lay.norm_offset
        out = {
            prefix + lay.enorm: self.enorm - off,
            prefix + lay.hnorm: self.hnorm - off,
            prefix + lay.eh_proj: self.eh_proj.t(),
            prefix + lay.shared_norm: self.shared_norm - off,
        }
        if self.head is not None:
            out[prefix + lay.head] = self.head.t()
        if self.embed_tokens is not None:
            out[prefix + lay.embed] = self.embed_tokens
        out = {k: v.detach().float().contiguous() for k, v in out.items()}
        out.update(self.block.export(prefix + lay.block))
        return out

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos, sin, kv_cache, attn):
        """embeds, hidden: [T, H] -> the hidden state to feed back [T, H]."""
        y = self.block(self.block_input(embeds, hidden), cos, sin, kv_cache, attn)
        return self.fed_back(y)

    def block_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder block's input: eh_proj of the normed token embedding and hidden state."""
        e = rms_norm(embeds, self.enorm, self.eps)
        h = rms_norm(hidden, self.hnorm, self.eps)
        pair = [h, e] if self.layout.hidden_first else [e, h]
        return linear(torch.cat(pair, dim=-1), self.eh_proj)

    def fed_back(self, y: torch.Tensor) -> torch.Tensor:
        """What the next draft step reads of the block's output ``y``."""
        if self.feedback == "post_norm":
            return rms_norm(y, self.shared_norm, self.eps)
        return y

    def normed(self, y: torch.Tensor) -> torch.Tensor:
        """The input of the head for a fed-back state ``y``."""
        return y if self.feedback == "post_norm" else rms_norm(y, self.shared_norm, self.eps)


class MTPModule(nn.Module):
    """The MTP layers of a model, sharing its embedding and lm_head unless they carry their own."""

    def __init__(self, model: nn.Module, layers: list[MTPLayer],
                 draft_vocab: torch.Tensor | None = None):
        super().__init__()
        self.model = [model]  # not a submodule: its weights belong to the main model
        self.layers = nn.ModuleList(layers)
        # reduced draft vocabulary: token ids the head may draft (None: all); q is 0 outside it
        self.register_buffer("draft_vocab", draft_vocab)
        self._draft_heads: dict[int, tuple] = {}  # step -> (head, restricted head, dtype)
        self._fused_blocks: dict[int, FusedDecoder] = {}  # layer -> its block as one call

    def embed(self, layer: MTPLayer, input_ids: torch.Tensor) -> torch.Tensor:
        if layer.embed_tokens is not None:
            return torch.nn.functional.embedding(input_ids, layer.embed_tokens)
        return self.model[0].embed(input_ids)

    def forward(self, step: int, input_ids, hidden, positions, kv_caches, attn) -> torch.Tensor:
        """Draft step ``step`` (0 = the pass over everything the main model computed): layer
        ``step`` when there are several, else the last one again. ``positions`` are rotary
        positions."""
        i = min(step, len(self.layers) - 1)
        layer = self.layers[i]
        model = self.model[0]
        embeds = self.embed(layer, input_ids)
        fused = None
        if attn.meta is not None:  # a paged cache
            fused = self._fused(i, kv_caches[i])
        if fused is not None:  # the block in one kernel call; its KV slot is one before
            y = fused.run(layer.block_input(embeds, hidden), positions, attn.meta, positions - 1)
            return layer.fed_back(y)
        cos = model.cos[positions]
        sin = model.sin[positions]
        return layer(embeds, hidden, cos, sin, kv_caches[i], attn)

    def _fused(self, i: int, kv_cache) -> FusedDecoder | None:
        """Layer ``i``'s block as one kernel call (kernels/cpu_decoder.py) where the main model
        runs so and the block fits; else None."""
        model = self.model[0]
        if not model.fusable:
            return None
        block = self.layers[i].block
        if not layer_fits(block):
            return None
        fused = FusedDecoder.bind(self._fused_blocks.get(i), [block], model.config, model.cos,
                                  model.sin, [kv_cache])
        self._fused_blocks[i] = fused
        return fused

    def fused_drafter(self, kv_caches: list) -> cpu_draft.FusedDrafter | None:
        """The draft loop in one kernel call (kernels/cpu_draft.py) where there is one MTP
        layer, its block runs fused and its weights are block weights; else None. Built anew:
        the proposer keeps the one it uses."""
        if len(self.layers) != 1:
            return None
        block = self._fused(0, kv_caches[0])
        if block is None:
            return None
        layer = self.layers[0]
        embed = layer.embed_tokens
        model = self.model[0]
        if embed is None and getattr(model, "embed_tokens", None) is None:
            embed = model.lm_head
        if self.draft_vocab is None:
            head = self.head(0)[1]
        else:
            head = self.draft_head(0)[1]
        if not cpu_draft.fits(layer, embed, head):
            return None
        return cpu_draft.FusedDrafter(layer, block, embed, head, self.draft_vocab)

    def head(self, step: int) -> tuple[MTPLayer, torch.Tensor]:
        layer = self.layers[min(step, len(self.layers) - 1)]
        if layer.head is not None:
            return layer, layer.head
        return layer, self.model[0].lm_head

    def draft_head(self, step: int) -> tuple[MTPLayer, torch.Tensor]:
        """The head restricted to the draft vocabulary, [H, N] (sliced once per head tensor)."""
        layer, head = self.head(step)
        key = min(step, len(self.layers) - 1)
        cached = self._draft_heads.get(key)
        if cached is None or cached[0] is not head or cached[2] != _dtype(head):
            cached = (head, _restrict(head, self.draft_vocab), _dtype(head))
            self._draft_heads[key] = cached
        return layer, cached[1]

    def draft_logits(self, step: int, y: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary only, [.., N] (``vocab_ids`` maps a column to its
        token id), or over the whole vocabulary when there is none."""
        if self.draft_vocab is None:
            layer, head = self.head(step)
        else:
            layer, head = self.draft_head(step)
        return linear(layer.normed(y), head)

    def widen(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Values over the draft vocabulary ([.., N]) as values over the whole vocabulary, ``fill``
        elsewhere."""
        if self.draft_vocab is None:
            return values
        out = values.new_full((*values.shape[:-1], self.model[0].config.vocab_size), fill)
        return out.index_copy_(-1, self.draft_vocab, values)

    def vocab_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """The token ids of columns of ``draft_logits``."""
        if self.draft_vocab is None:
            return columns
        return self.draft_vocab[columns]

    def compute_logits(self, step: int, y: torch.Tensor) -> torch.Tensor:
        """Draft logits over the whole vocabulary;
        -inf outside the draft vocabulary when there is one."""
        return self.widen(self.draft_logits(step, y), float("-inf"))


def _restrict(head, vocab: torch.Tensor):
    """``head`` ([H, V], or a quantized one) over the outputs ``vocab`` only."""
    if isinstance(head, ROW_HEADS):
        return head.rows(vocab)
    return head[:, vocab].contiguous()


def _dtype(head) -> torch.dtype | None:
    """A float head's dtype, which ``.to()`` changes in place (None for a quantized one)."""
    return getattr(head, "dtype", None)


def build_mtp(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    num_layers: int,
    layout: MTPLayout,
    prefix_of,
    feedback: str = "pre_norm",
    draft_vocab: torch.Tensor | None = None,
) -> MTPModule:
    """``prefix_of(i)`` names the weight prefix of MTP layer i (e.g. ``model.layers.{N+i}.``)."""
    cfg = model.config
    layers = []
    for i in range(num_layers):
        prefix = prefix_of(i)
        lay = replace(layout, block=layout.block.format(i=i))
        if not any(k.startswith(prefix + lay.block) for k in weights):
            raise ModelLoadError(f"the config promises {num_layers} MTP layer(s) but the weights "
                                 f"have none under {prefix + lay.block!r}")
        block = model.make_layer(cfg.num_hidden_layers + i)
        layer = MTPLayer(block, cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps, lay, feedback)
        layer.load(weights, prefix)
        layers.append(layer)
    return MTPModule(model, layers, draft_vocab)
