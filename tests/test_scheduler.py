"""Scheduler without a model: token budgets, chunked prefill, max_num_seqs, preemption, finishing."""

from mtpserve.engine.kv_cache import KVCacheManager
from mtpserve.engine.request import Request, RequestStatus
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.scheduler import Scheduler, StepResult


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_model_len=1000):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, max_num_seqs, budget, max_model_len), kv


def req(rid, prompt_len, max_tokens=100, eos=frozenset({0})):
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   eos_token_ids=eos)


def fake_step(sched, token=5):
    """Schedule, pretend the model ran, sample ``token`` for requests that reached their end."""
    out = sched.schedule()
    sampled = {s.request.request_id: [token] for s in out.scheduled if s.samples}
    finished = sched.update_from_output(out, StepResult(new_token_ids=sampled))
    return out, finished


def test_chunked_prefill_under_budget():
    sched, kv = make(budget=8)
    a, b = req("a", 20), req("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = fake_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 8)]
    assert not out.scheduled[0].samples and a.output_token_ids == []
    out, _ = fake_step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 8)]
    out, _ = fake_step(sched)  # a: last 4 prompt tokens (samples), b: its 3 tokens fit in the remaining 4
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 4), ("b", 3)]
    assert a.output_token_ids == [5] and b.output_token_ids == [5]
    out, _ = fake_step(sched)  # both decode
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 1)]
    assert a.num_computed_tokens == 21 and a.num_tokens == 22


def test_max_num_seqs():
    sched, _ = make(max_num_seqs=2, budget=100)
    for i in range(3):
        sched.add_request(req(f"r{i}", 2))
    out, _ = fake_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_stop_on_eos_and_length_and_frees_blocks():
    sched, kv = make()
    a, b = req("a", 5, max_tokens=3), req("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    fake_step(sched)
    _, finished = fake_step(sched, token=0)  # eos for both... a has 2 tokens, b stops on eos
    assert {r.request_id for r in finished} == {"a", "b"}
    assert a.status == RequestStatus.FINISHED_STOPPED and a.finish_reason == "stop"
    assert kv.num_free_blocks == 64 and not sched.has_unfinished_requests()
    c = req("c", 5, max_tokens=2)
    sched.add_request(c)
    fake_step(sched)
    _, finished = fake_step(sched)
    assert finished == [c] and c.finish_reason == "length" and len(c.output_token_ids) == 2


def test_max_model_len_stops_generation():
    sched, _ = make(max_model_len=7)
    a = req("a", 5)
    sched.add_request(a)
    while sched.has_unfinished_requests():
        fake_step(sched)
    assert a.num_tokens == 7 and a.finish_reason == "length"


def test_preemption_recomputes_and_completes():
    sched, kv = make(num_blocks=6, block_size=4, budget=64)  # 24 token slots
    reqs = [req(f"r{i}", 6, max_tokens=8) for i in range(3)]  # each needs up to 14 slots (4 blocks)
    for r in reqs:
        sched.add_request(r)
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        out, _ = fake_step(sched)
        preempted += len(out.preempted)
        used = sum(len(t) for t in kv.block_tables.values())
        assert used + kv.num_free_blocks == 6
    assert not sched.has_unfinished_requests()
    assert preempted > 0 and sched.num_preemptions == preempted
    assert all(r.finish_reason == "length" and len(r.output_token_ids) == 8 for r in reqs)
    assert kv.num_free_blocks == 6


def test_abort_waiting_and_running():
    sched, kv = make()
    a, b = req("a", 4), req("b", 4)
    sched.add_request(a)
    fake_step(sched)
    sched.add_request(b)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)  # twice is harmless
    assert not sched.has_unfinished_requests() and kv.num_free_blocks == 64
    assert a.finish_reason == "abort"
