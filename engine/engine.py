"""The synchronous engine core: requests in, token deltas out, one short step at a time."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.errors import RequestError
from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.loader.checkpoint import Checkpoint
from mtpserve.engine.models.llama import LlamaForCausalLM
from mtpserve.engine.request import Request, RequestStatus
from mtpserve.engine.runner import ModelRunner, kv_bytes_per_block
from mtpserve.engine.sampler import make_generator
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request: Request
    new_token_ids: list[int]
    finished: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        mc = self.model_config = checkpoint.config
        self.device = torch.device(config.device)
        per_block = kv_bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                       mc.head_dim, config.dtype)
        num_blocks = config.num_blocks or max(1, config.kv_cache_memory_bytes // per_block)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * config.block_size)
        model = LlamaForCausalLM(mc, max_positions=max(self.max_model_len, mc.max_position_embeddings))
        model.load_weights(checkpoint.weights)
        self.model = model.to_runtime(config.dtype, self.device).eval()
        self.kv = KVCacheManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv, num_blocks, config.dtype, self.device)
        self.eos_token_ids = frozenset(checkpoint.generation.eos_token_ids or mc.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d", num_blocks,
                    config.block_size, num_blocks * per_block / 2**20, self.max_model_len)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        params.validate()
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but this model's context (max_model_len) is "
                f"{self.max_model_len}, which must also hold at least one generated token",
                code="context_length_exceeded", param="messages")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        req = Request(request_id, list(prompt_token_ids), params, eos_token_ids=self.eos_token_ids,
                      generator=make_generator(params.seed, self.device))
        self.requests[request_id] = req
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        before = {s.request.request_id: len(s.request.output_token_ids) for s in out.scheduled}
        sampled = self.runner.execute(out)
        self.scheduler.update_from_output(out, sampled)
        outputs = []
        for s in out.scheduled:
            req = s.request
            new = req.output_token_ids[before[req.request_id]:]
            if new or req.status.finished:
                outputs.append(RequestOutput(req, new, req.status.finished))
            if req.status.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams) -> list[Request]:
        """Run the given prompts to completion (batched); returns the finished requests in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add_request(f"generate-{next(self._ids)}", p, sp) for p, sp in zip(prompts, params)]
        while any(not r.status.finished for r in reqs):
            self.step()
        return reqs
