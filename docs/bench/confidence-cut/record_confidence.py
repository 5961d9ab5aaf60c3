"""The head's confidence in each draft (the top probability of its draft softmax, greedy; of q, sampled) and how
many drafts were accepted, fixed k, on the per-step draft path (whose logits PyTorch computes).

    python docs/bench/confidence-cut/record_confidence.py PROMPTS.jsonl K OUT.json [TEMPERATURE]

Writes [kind, [confidence of draft 1..k], accepted drafts] per verify step; a sampled prompt i is seeded with i.
"""
import json
import sys

from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.sampling_params import SamplingParams

prompts_file, k, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
temperature = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
config = EngineConfig(quantization="int4", mtp_head=default_head_path(), spec_draft_n_max=k, spec_adaptive=False)
engine = LLMEngine(load_gguf(default_gguf_path(), quantized=True), config)
proposer = engine.runner.proposer
proposer.one_call_drafter = lambda requests: None  # the per-step path
# the draft path computes its confidences only under a cut: one too low to cut anything (a draft's top probability
# is at least 1 / vocabulary, so k <= 5 drafts keep a product above 1e-24)
engine.policy.explicit_p_min = 1e-30
choose = proposer._choose
confidences = []


def recording(*args):
    tokens, confidence = choose(*args)
    confidences.append(confidence)
    return tokens, confidence


proposer._choose = recording
tok = engine.tokenizer
records = []
for i, line in enumerate(open(prompts_file, encoding="utf-8")):
    row = json.loads(line)
    ids = tok.encode(tok.apply_chat_template(row["messages"]), add_special_tokens=False)
    params = SamplingParams(temperature=temperature, max_tokens=128, seed=i)
    req = engine.add_request(f"p{i}", ids, params)
    pending = None
    while not req.status.finished:
        confidences.clear()
        before = len(req.output_token_ids)
        engine.step()
        emitted = len(req.output_token_ids) - before
        if pending is not None and emitted:
            records.append((row["kind"], pending, emitted - 1))
        pending = [c[0] for c in confidences] if confidences else None
json.dump(records, open(out_file, "w"))
