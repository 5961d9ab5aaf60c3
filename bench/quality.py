"""What a weight format costs in quality, shown on text: the mean next-token negative log-likelihood
(NLL) over held-out text, and greedy continuations, against the float32 path with dequantized
weights (the exact reference).

The text is the long descriptions of pinned packages this project installs (prose with some code):
fixed for a given constraints.txt and never part of an MTP head's training data.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import torch

from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.kernels.attention import DenseCausalAttention

NLL_TOKENS = 4096
TEXT_PACKAGES = ("fastapi", "tqdm", "httpx", "starlette", "uvicorn", "tokenizers", "numpy")
CHUNK_TOKENS = 512


def held_out_chunks(tokenizer, num_tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    """About ``num_tokens`` tokens of held-out text in chunks of ``chunk_tokens``."""
    chunks = []
    total = 0
    for name in TEXT_PACKAGES:
        text = importlib.metadata.distribution(name).metadata.get_payload() or ""
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids) - 64, chunk_tokens):
            chunk = ids[start:start + chunk_tokens]
            chunks.append(chunk)
            total += len(chunk)
            if total >= num_tokens:
                return chunks
    return chunks


@torch.inference_mode()
def chunk_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one sequence, without a KV cache."""
    device = model.norm.device
    input_ids = torch.tensor(ids, device=device)
    positions = torch.arange(len(ids), device=device)
    hidden = model(input_ids, positions, [None] * len(model.layers), DenseCausalAttention())
    return model.compute_logits(hidden).float()


def score(model, chunks: list[list[int]]) -> tuple[float, list[torch.Tensor]]:
    """Mean NLL of every next token, and each chunk's argmax predictions."""
    total = 0.0
    count = 0
    predictions = []
    for ids in chunks:
        logits = chunk_logits(model, ids)[:-1]
        targets = torch.tensor(ids[1:], device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        total += float(nll)
        count += len(ids) - 1
        predictions.append(logits.argmax(-1).cpu())
    return total / count, predictions


def compare_nll(model, reference, chunks: list[list[int]]) -> dict:
    """NLL of ``model`` and ``reference`` on the same chunks, and how often their top-1 agree."""
    nll, predictions = score(model, chunks)
    ref_nll, ref_predictions = score(reference, chunks)
    same = 0
    total = 0
    for ours, theirs in zip(predictions, ref_predictions):
        same += int((ours == theirs).sum())
        total += len(ours)
    return {"tokens": total, "nll": nll, "reference_nll": ref_nll,
            "nll_ratio": nll / ref_nll, "top1_agreement": same / total}


def compare_greedy(engine, reference, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    """Greedy continuations of ``prompts`` (``max_tokens`` each, EOS ignored): how many equal the
    reference's, and how many leading tokens agree on average."""
    params = []
    for n in max_tokens:
        params.append(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    ours = engine.generate(prompts, params)
    theirs = reference.generate(prompts, params)
    equal = 0
    common = 0
    for a, b in zip(ours, theirs):
        equal += a.output_token_ids == b.output_token_ids
        common += _common_prefix(a.output_token_ids, b.output_token_ids)
    return {"prompts": len(prompts), "tokens": sum(max_tokens), "equal": equal,
            "mean_common_prefix": common / len(prompts),
            "mean_tokens": sum(max_tokens) / len(prompts)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def measure(engine, prompts) -> dict:
    """The quality section of ``mtpserve bench``: ``engine`` against a float32 engine with
    dequantized weights on the same checkpoint (nothing to compare when it is that already)."""
    config = engine.config
    if config.quantization == "none" and config.dtype in (torch.float32, torch.float64):
        return {"skipped": "the engine runs the float32 reference path itself"}
    reference_config = dataclasses.replace(config, dtype=torch.float32, quantization="none",
                                           spec_draft_n_max=0, mtp_head=None, num_blocks=None)
    # the same checkpoint: stored codes dequantize exactly on the "none" path
    reference = LLMEngine(engine.checkpoint, reference_config)
    chunk_tokens = min(CHUNK_TOKENS, engine.max_model_len)
    chunks = held_out_chunks(engine.tokenizer, NLL_TOKENS, chunk_tokens)
    result = {"engine": f"{config.quantization} weights, {str(config.dtype).removeprefix('torch.')}"}
    result["nll"] = compare_nll(engine.model, reference.model, chunks)
    prompt_ids = [p.token_ids(engine.tokenizer) for p in prompts]
    max_tokens = [p.max_tokens for p in prompts]
    result["greedy"] = compare_greedy(engine, reference, prompt_ids, max_tokens)
    return result
