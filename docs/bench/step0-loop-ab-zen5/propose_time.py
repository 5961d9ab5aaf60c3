"""Mean wall time of MTPProposer.propose and of a whole engine step, k=3 fixed, greedy, 4 code + 4 chat prompts."""
import json, sys, time
from mtpserve.engine.config import EngineConfig
from mtpserve.engine.engine import LLMEngine
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.loader.mtp_head import default_head_path
from mtpserve.engine.sampling_params import SamplingParams
eng = LLMEngine(load_gguf(default_gguf_path(), quantized=True), EngineConfig(quantization="int4", mtp_head=default_head_path(), spec_draft_n_max=3, spec_adaptive=False))
prop = eng.runner.proposer
orig = prop.propose
times = []
def timed(items):
    t = time.perf_counter(); out = orig(items); times.append(time.perf_counter() - t); return out
prop.propose = timed
rows = [json.loads(l) for l in open("bench/prompts/eval_hand.jsonl")]
chats = [r for r in rows if r["kind"] == "code"][:4] + [r for r in rows if r["kind"] == "chat"][:4]
tok = eng.tokenizer
step_times = []
for rep in range(2):
    for i, r in enumerate(chats):
        ids = tok.encode(tok.apply_chat_template(r["messages"]), add_special_tokens=False)
        req = eng.add_request(f"r{rep}-{i}", ids, SamplingParams(temperature=0, max_tokens=128))
        while not req.status.finished:
            t = time.perf_counter(); eng.step(); step_times.append(time.perf_counter() - t)
times = sorted(times)[: int(len(times) * 0.9)]
st = sorted(step_times)[: int(len(step_times) * 0.9)]
print(f"{sys.argv[1]}: propose {1000*sum(times)/len(times):.2f} ms over {len(times)} calls; step {1000*sum(st)/len(st):.2f} ms over {len(st)}")
