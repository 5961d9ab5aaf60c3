"""The synchronous engine core: requests in, token deltas out, one short step at a time."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from mtpserve.engine.attention_backend import resolve_attention_backend
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.errors import MtpserveError, RequestError
from mtpserve.engine.loader.checkpoint import Checkpoint
from mtpserve.engine.loader.mtp_head import load_mtp_head, rename_gguf_nextn
from mtpserve.engine.models import model_class
from mtpserve.engine.models.mtp import DEEPSEEK_LAYOUT, MIMO_LAYOUT, QWEN_LAYOUT, build_mtp
from mtpserve.engine.models.quantize import BLOCK_FORMS, WEIGHT_FORMS, prepare_weights
from mtpserve.engine.noise import RequestNoise
from mtpserve.engine.prefix_cache import engine_salt
from mtpserve.engine.recurrent_state import HybridCacheManager, cache_manager
from mtpserve.engine.request import Request, RequestStatus
from mtpserve.engine.runner import ModelRunner, kv_bytes_per_block
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.scheduler import Scheduler
from mtpserve.engine.spec.calibrate import measure_step_costs
from mtpserve.engine.spec.policy import DraftPolicy, StepCosts
from mtpserve.engine.spec.stats import SpecStats
from mtpserve.kernels.cpu_blocks import BlockLinear

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request, as values only: it crosses to the server's event loop
    while the engine thread goes on with the live request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple  # per new token (logprob, top-n [(token, logprob)]), when asked for
    finish_reason: str | None  # set on the request's last output
    spec_stats: SpecStats  # a copy: the request's speculation statistics so far
    timings: dict  # the request's metrics.timings block so far
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, req: Request, num_before: int) -> RequestOutput:
        """The output of ``req``'s tokens from index ``num_before`` on."""
        new_token_ids = tuple(req.output_token_ids[num_before:])
        new_logprobs = tuple(req.output_logprobs[num_before:])
        return cls(req.request_id, new_token_ids, new_logprobs, req.finish_reason,
                   req.spec_stats.copy(), req.timings(), req.num_cached_tokens)


@dataclass
class LoadedModels:
    """What an engine loads and measures once; engines on one checkpoint and config can share it."""

    model: torch.nn.Module
    mtp: torch.nn.Module | None
    draft_vocab: torch.Tensor | None
    step_costs: StepCosts  # the draft policy's, measured at start when drafting is adaptive

    @property
    def num_mtp_layers(self) -> int:
        if self.mtp is None:
            return 0
        return len(self.mtp.layers)


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None,
                 models: LoadedModels | None = None):
        """``models``: the loaded models and measured step costs of an engine on the same checkpoint
        and config, to share instead of loading them again (``engine.models``)."""
        self.config = config = config or EngineConfig()
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.model_config = checkpoint.config
        self.device = torch.device(config.device)
        self.attention_backend = resolve_attention_backend(config.attention_backend,
                                                           self.device, config.dtype)
        self.draft_vocab = None  # a head's reduced draft vocabulary
        if models is None:
            mtp_weights, num_mtp = self._mtp_weights()
        else:
            num_mtp = models.num_mtp_layers
            self.draft_vocab = models.draft_vocab
        self._size_kv_cache(num_mtp, warn=models is None)
        if models is None:
            self._build_models(mtp_weights, num_mtp)
        else:
            self.model = models.model
            self.mtp = models.mtp
        num_spec = config.spec_draft_n_max if self.mtp else 0
        self.kv = cache_manager(self.model, self.num_blocks, config, num_spec)
        self.prefix_caching = self._enable_prefix_caching()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len)
        self.policy = DraftPolicy(num_spec, config.spec_adaptive, p_min=config.spec_draft_p_min)
        self.runner = ModelRunner(self.model, self.kv, self.num_blocks, config.dtype, self.device,
                                  self.mtp, self.policy, self.attention_backend)
        self._capture_graphs(num_spec)
        if models is not None:
            self.policy.costs = models.step_costs
        elif num_spec and config.spec_adaptive:
            self.policy.costs = measure_step_costs(self.runner, min(64, config.max_num_seqs),
                                                   config.max_num_batched_tokens, num_spec)
        self.models = LoadedModels(self.model, self.mtp, self.draft_vocab, self.policy.costs)
        eos_token_ids = checkpoint.generation.eos_token_ids or self.model_config.eos_token_ids
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.spec_stats = SpecStats()  # aggregate over finished requests
        self._ids = itertools.count()
        logger.info("%s", self.summary())

    def _size_kv_cache(self, num_mtp: int, warn: bool) -> None:
        """Blocks of the paged KV cache (every attention layer, MTP layers included) and the context
        they allow; ``warn``: say so when the cache caps the context below what was asked for."""
        mc, config = self.model_config, self.config
        num_layers = 0
        for i in range(mc.num_hidden_layers + num_mtp):
            num_layers += mc.has_kv(i)
        per_block = kv_bytes_per_block(num_layers, config.block_size, mc.num_key_value_heads,
                                       mc.head_dim, config.dtype)
        self.num_blocks = config.num_blocks or max(1, config.kv_cache_memory_bytes // per_block)
        self.kv_cache_bytes = self.num_blocks * per_block
        wanted = config.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(wanted, self.num_blocks * config.block_size)
        if warn and self.max_model_len < wanted:
            logger.warning("max_model_len is %d, below the %d asked for: the KV cache holds "
                           "%d blocks of %d tokens; raise --kv-cache-memory or --num-blocks "
                           "for longer contexts",
                           self.max_model_len, wanted, self.num_blocks, config.block_size)

    def _enable_prefix_caching(self) -> str:
        """Turn the prefix cache on unless asked not to or the model keeps state that cached
        blocks do not hold; returns what the start-up line says about it."""
        config = self.config
        if not config.enable_prefix_caching:
            return "prefix caching off"
        if isinstance(self.kv, HybridCacheManager):
            logger.info("prefix caching off: the linear-attention layers' recurrent state is "
                        "per request, and cached blocks do not hold it")
            return "prefix caching off (hybrid model)"
        if self.mtp is not None and len(self.mtp.layers) > 1:
            logger.info("prefix caching off: chained MTP layers read the previous layer's output "
                        "at the position before, which cached blocks do not hold")
            return "prefix caching off (chained MTP layers)"
        salt = engine_salt(self.checkpoint.source, self.checkpoint.weight_format,
                           self.model_config, config.quantization, config.quantization_group_size,
                           config.dtype, config.block_size, config.mtp_head, config.mtp_feedback)
        self.kv.enable_prefix_caching(salt, draft_kv=self.mtp is not None)
        return "prefix caching on"

    def _capture_graphs(self, num_spec: int) -> None:
        """CUDA graphs for decode and verify steps where the device, the model and the attention
        backend allow them (engine/cuda_graph.py)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        if not self.model.CUDA_GRAPHS or not self.runner.attn.capturable:
            logger.info("CUDA graphs: off, this model or attention backend runs eagerly")
            return
        max_blocks = self.kv.blocks_needed(self.max_model_len + num_spec + 1)
        self.runner.capture_graphs(self.config.max_num_seqs, num_spec + 1, max_blocks)

    def summary(self) -> str:
        """What the user got: context length, KV cache, dtype, weights, attention backend,
        speculation."""
        config = self.config
        dtype = str(config.dtype).removeprefix("torch.")
        weights = self.checkpoint.weight_format or "unknown format"
        if config.quantization == "none" and weights.startswith("GGUF"):
            weights += ", dequantized"
        elif config.quantization != "none":
            forms = WEIGHT_FORMS
            if isinstance(self.model.lm_head, BlockLinear):
                forms = BLOCK_FORMS
            weights += f", projections {forms[config.quantization]}"
        kv = (f"KV cache {self.kv_cache_bytes / 2**20:.0f} MiB ({self.num_blocks} blocks of "
              f"{config.block_size} tokens)")
        return (f"max_model_len {self.max_model_len}, {kv}, dtype {dtype}, weights {weights}, "
                f"attention {self.attention_backend}, {self._graphs_summary()}"
                f"{self.prefix_caching}, {self._mtp_summary()}")

    def _graphs_summary(self) -> str:
        runner = self.runner
        if runner.graphs is None:
            return ""
        return f"CUDA graphs {runner.num_graphs} (captured in {runner.capture_seconds:.1f} s), "

    def _mtp_summary(self) -> str:
        if self.mtp is None:
            return "MTP off (plain decoding)"
        vocab = self.model_config.vocab_size
        draft_vocab = len(self.draft_vocab) if self.draft_vocab is not None else vocab
        mode = "adaptive" if self.config.spec_adaptive else "fixed"
        if self.policy.p_min > 0:
            mode += f", chains cut below confidence {self.policy.p_min:g}"
        return (f"MTP {len(self.mtp.layers)} layer(s), draft vocabulary {draft_vocab} of {vocab}, "
                f"up to {self.policy.n_max} drafts per step ({mode})")

    def _build_models(self, mtp_weights: dict, num_mtp: int) -> None:
        mc, config = self.model_config, self.config
        longest = max(self.max_model_len, mc.max_position_embeddings)
        max_positions = longest + config.spec_draft_n_max + 2
        model = model_class(mc.architecture)(mc, max_positions=max_positions)
        model.load_weights(self.checkpoint.weights)
        prepare_weights(model, config.quantization, config.quantization_group_size, self.device,
                        config.cpu_kernels)
        self.model = model.to_runtime(config.dtype, self.device).eval()
        self.mtp = None
        if num_mtp and mc.mtp_layout == "mimo" and not config.mtp_head:
            # feeds back final_layernorm's output
            self.mtp = build_mtp(self.model, mtp_weights, num_mtp, MIMO_LAYOUT,
                                 lambda i: f"model.mtp_layers.{i}.", "post_norm")
        elif num_mtp and mc.mtp_layout == "qwen" and not config.mtp_head:
            # feeds back mtp.norm's output
            self.mtp = build_mtp(self.model, mtp_weights, num_mtp, QWEN_LAYOUT,
                                 lambda i: "mtp.", "post_norm")
        elif num_mtp:
            self.mtp = build_mtp(self.model, mtp_weights, num_mtp, DEEPSEEK_LAYOUT,
                                 lambda i: f"model.layers.{mc.num_hidden_layers + i}.",
                                 config.mtp_feedback, self.draft_vocab)
        if self.mtp is not None:
            prepare_weights(self.mtp, config.quantization, config.quantization_group_size,
                            self.device, config.cpu_kernels)
            self.mtp.to(device=self.device, dtype=config.dtype).eval()

    def _mtp_weights(self) -> tuple[dict, int]:
        """MTP weights and layer count: a --mtp-head file, else the checkpoint's own layers."""
        cfg, mc, weights = self.config, self.checkpoint.config, self.checkpoint.weights
        if cfg.spec_draft_n_max < 0:
            raise MtpserveError("spec_draft_n_max must be >= 0")
        if cfg.mtp_head:
            head_weights, head = load_mtp_head(cfg.mtp_head, mc)
            num = int(head.get("num_nextn_predict_layers", 1))
            self.config.mtp_feedback = head.get("feedback", cfg.mtp_feedback)
            self.draft_vocab = head.get("draft_token_ids")
            logger.info("MTP: %d layer(s) from head %s", num, cfg.mtp_head)
            return ({**weights, **head_weights}, num) if cfg.spec_draft_n_max > 0 else ({}, 0)
        rename_gguf_nextn(weights)
        num = mc.num_nextn_predict_layers
        if num == 0:
            logger.info("MTP: the model has no MTP layers; plain decoding "
                        "(train one with mtpserve train-head)")
            return {}, 0
        if cfg.spec_draft_n_max == 0:
            logger.info("MTP: speculation disabled; plain decoding")
            return {}, 0
        return weights, num

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    spec_n_max: int | None = None) -> Request:
        params.validate()
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but this model's context "
                f"(max_model_len) is {self.max_model_len}, which must also hold at least one "
                f"generated token",
                code="context_length_exceeded", param="messages")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if spec_n_max is not None and spec_n_max < 0:
            raise RequestError("speculative n_max must be >= 0", param="speculative")
        req = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                      noise=RequestNoise.of(params.seed), spec_n_max=spec_n_max)
        self.requests[request_id] = req
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self.runner.free(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        for req in out.preempted:
            self.runner.free(req.request_id)
        before = {s.request.request_id: len(s.request.output_token_ids) for s in out.scheduled}
        try:
            result = self.runner.execute(out)
        except Exception:  # noqa: BLE001 (isolated: only this step's requests fail)
            return self._fail_step(out)
        finished = self.scheduler.update_from_output(out, result)
        outputs = []
        for s in out.scheduled:
            req = s.request
            num_before = before[req.request_id]
            if len(req.output_token_ids) > num_before or req.status.finished:
                outputs.append(RequestOutput.of(req, num_before))
        for req in finished:
            self.requests.pop(req.request_id, None)
            self.runner.free(req.request_id)
            self.spec_stats.merge(req.spec_stats)
        return outputs

    def _fail_step(self, out) -> list[RequestOutput]:
        """The model step raised: finish its requests with FINISHED_ERROR (blocks freed); the
        others go on."""
        ids = [s.request.request_id for s in out.scheduled]
        logger.exception("model step failed; failing its %d request(s): %s",
                         len(ids), ", ".join(ids))
        outputs = []
        for s in out.scheduled:
            self.scheduler.finish(s.request, RequestStatus.FINISHED_ERROR)
            self.requests.pop(s.request.request_id, None)
            self.runner.free(s.request.request_id)
            outputs.append(RequestOutput.of(s.request, len(s.request.output_token_ids)))
        return outputs

    def generate(self, prompts: list[list[int]],
                 params: list[SamplingParams] | SamplingParams) -> list[Request]:
        """Run the given prompts to completion (batched); returns the finished requests in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add_request(f"generate-{next(self._ids)}", p, sp)
                for p, sp in zip(prompts, params)]
        while any(not r.status.finished for r in reqs):
            self.step()
        return reqs
