"""Prefix caching: block hashes, the LRU and reference counts without a model; then the engine on tiny
checkpoints, whose greedy outputs (float64, see test_mtp.py) must not change when the cache is on."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine
from mtp_helpers import save_distilled_head, save_random_head
from test_server import GREEDY as SERVER_GREEDY
from test_server import MODEL, base_url, client, http, scrape, sse_events  # noqa: F401 (fixtures)
from tiny_qwen3_next import make_tiny_qwen3_next

from mtpserve.engine.kv_cache import BlockPool, KVCacheManager
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.prefix_cache import engine_salt, extend_block_hashes
from mtpserve.engine.request import Request
from mtpserve.engine.sampling_params import SamplingParams

B = 4  # block size of every cache here
ROOT = engine_salt("test")


def hashes(tokens: list[int]) -> list[bytes]:
    return extend_block_hashes([], ROOT, tokens, B)


def request(rid: str, tokens: list[int], spec_n_max: int | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(temperature=0), spec_n_max=spec_n_max)


def computed(kv: KVCacheManager, req: Request, num_tokens: int) -> None:
    """Pretend the model computed ``req``'s first ``num_tokens`` tokens (and their MTP KV)."""
    req.num_computed_tokens = num_tokens
    kv.mark_draft_kv(req.request_id, num_tokens)
    kv.cache_blocks(req)


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit ``req`` with its cached prefix; returns the number of cached tokens."""
    cached = kv.cached_prefix(req)
    assert kv.admit(req, cached, req.num_tokens)
    req.num_computed_tokens = len(cached) * B
    return req.num_computed_tokens


def caching_manager(num_blocks: int, draft_kv: bool = False) -> KVCacheManager:
    kv = KVCacheManager(num_blocks, B)
    kv.enable_prefix_caching(b"test", draft_kv)
    return kv


# --- hashes ---------------------------------------------------------------------------------------

def test_a_block_is_hashed_once_the_token_after_it_is_known():
    tokens = list(range(10, 22))  # 3 full blocks
    assert len(hashes(tokens[:4])) == 0  # block 0 is full but its next token is unknown
    assert len(hashes(tokens[:5])) == 1
    assert len(hashes(tokens[:12])) == 2
    assert len(hashes(tokens + [99])) == 3
    grown = extend_block_hashes(hashes(tokens[:5]), ROOT, tokens + [99], B)  # extending == hashing anew
    assert grown == hashes(tokens + [99])


def test_hashes_chain_over_every_earlier_token_and_the_next_one():
    tokens = list(range(10, 23))
    base = hashes(tokens)
    assert len(set(base)) == 3
    changed_first = hashes([7] + tokens[1:])
    assert all(a != b for a, b in zip(base, changed_first))  # a change in block 0 reaches every block
    changed_next = hashes(tokens[:4] + [7] + tokens[5:])  # token 4: block 1, and block 0's next token
    assert changed_next[0] != base[0] and changed_next[1] != base[1]
    changed_late = hashes(tokens[:9] + [7] + tokens[10:])  # block 2 only
    assert changed_late[:2] == base[:2] and changed_late[2] != base[2]
    assert extend_block_hashes([], engine_salt("other model"), tokens, B)[0] != base[0]  # the salt counts


def test_drafts_are_never_hashed_nor_cached():
    kv = caching_manager(8, draft_kv=True)
    req = request("a", list(range(10, 19)))  # 9 tokens
    admit(kv, req)
    req.spec_token_ids = [1, 2, 3]
    before = list(kv.block_hashes(req))
    assert kv.block_hashes(req) == before == extend_block_hashes([], kv.roots[1], list(range(10, 19)), B)
    computed(kv, req, 8)
    assert kv.pool.cached == {h: b for h, b in zip(before, kv.block_tables["a"])}
    # KV computed for drafts (a verify step) but not kept: nothing past the verified tokens is cached
    req.num_computed_tokens = 8
    kv.allocate_slots("a", 12)
    kv.cache_blocks(req)
    assert len(kv.pool.cached) == 2


# --- pool: LRU and reference counts -------------------------------------------------------------

def test_freed_cached_blocks_wait_in_an_lru_and_are_evicted_least_recent_first():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    for block, h in zip(a + b, [b"a0", b"a1", b"b0", b"b1"]):
        pool.register(block, h)
    pool.free(a)  # tail first: a1 is older in the LRU than a0
    pool.free(b)
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0
    assert list(pool.lru) == [a[1], a[0], b[1], b[0]]
    assert pool.allocate(1) == [a[1]]  # evicted: its hash is forgotten
    assert pool.lookup(b"a1") is None and pool.lookup(b"a0") == a[0] and pool.num_evictions == 1
    pool.incref(b[1])  # a hit takes a free cached block out of the LRU
    assert b[1] not in pool.lru and pool.ref_cnt[b[1]] == 1
    assert pool.allocate(3) is None  # only a0 and b0 are free
    assert pool.allocate(2) == [a[0], b[0]]
    assert pool.cached == {b"b1": b[1]}


def test_empty_blocks_go_before_cached_ones():
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.register(a[0], b"kept")
    pool.free(a)  # a[1] was never registered: it is empty again
    assert pool.allocate(2) == [2, a[1]]
    assert pool.lookup(b"kept") == a[0]


def test_a_hash_held_by_another_block_keeps_that_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"same")
    pool.register(b, b"same")  # computed twice at once: b stays unregistered
    pool.free([a, b])
    assert pool.lookup(b"same") == a and list(pool.lru) == [a] and list(pool.empty_blocks) == [b]


# --- manager: sharing ----------------------------------------------------------------------------

def test_requests_share_the_longest_cached_chain_through_reference_counts():
    kv = caching_manager(16)
    a = request("a", list(range(10, 23)))  # 13 tokens: 3 blocks hashable
    assert admit(kv, a) == 0
    computed(kv, a, 13)
    b = request("b", list(range(10, 20)) + [5, 6, 7])  # shares 10 tokens: 2 blocks (+ next token)
    assert admit(kv, b) == 8
    shared = kv.block_tables["a"][:2]
    assert kv.block_tables["b"][:2] == shared and kv.block_tables["b"][2] not in kv.block_tables["a"]
    assert [kv.pool.ref_cnt[x] for x in shared] == [2, 2]
    kv.free("a")
    assert [kv.pool.ref_cnt[x] for x in shared] == [1, 1] and not set(shared) & set(kv.pool.lru)
    assert len(kv.pool.lru) == 1  # a's third block
    kv.free("b")
    assert kv.pool.num_free_blocks == 16 and all(r == 0 for r in kv.pool.ref_cnt)
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (26, 8)


def test_the_last_token_is_always_recomputed():
    kv = caching_manager(16)
    a = request("a", list(range(10, 19)))
    admit(kv, a)
    computed(kv, a, 9)
    assert len(kv.pool.cached) == 2
    assert admit(kv, request("b", list(range(10, 18)))) == 4  # block 1 holds b's last token
    assert admit(kv, request("c", list(range(10, 19)))) == 8


def test_with_mtp_a_block_is_cached_once_its_draft_kv_is_filled():
    kv = caching_manager(16, draft_kv=True)
    a = request("a", list(range(10, 23)))
    admit(kv, a)
    a.num_computed_tokens = 12
    kv.cache_blocks(a)
    assert kv.pool.cached == {}  # main KV only: the MTP pass for these positions was deferred
    kv.mark_draft_kv("a", 5)
    kv.cache_blocks(a)
    assert len(kv.pool.cached) == 1
    # a request that never fills the MTP KV has a chain of its own: it neither serves nor reads MTP KV
    plain = request("p", list(range(10, 23)), spec_n_max=0)
    assert admit(kv, plain) == 0
    computed(kv, plain, 13)
    assert admit(kv, request("q", list(range(10, 23)), spec_n_max=0)) == 12
    assert admit(kv, request("r", list(range(10, 23)))) == 4


def test_a_second_choice_waits_for_the_blocks_the_first_is_computing():
    kv = caching_manager(16)
    first = request("c-0", list(range(10, 23)))
    admit(kv, first)
    second = request("c-1", list(range(10, 23)))
    assert kv.waits_for_prefix(second, len(kv.cached_prefix(second)))
    computed(kv, first, 8)  # a chunk: the prompt is not done, still promised
    assert kv.waits_for_prefix(second, len(kv.cached_prefix(second)))
    computed(kv, first, 13)
    assert not kv.promised and not kv.waits_for_prefix(second, 3)
    assert admit(kv, second) == 12
    kv.free("c-0")
    kv.free("c-1")
    assert kv.pool.num_free_blocks == 16


def test_a_hit_is_refused_whole_when_the_rest_does_not_fit():
    kv = caching_manager(4)
    a = request("a", list(range(10, 19)))
    admit(kv, a)
    computed(kv, a, 9)
    kv.free("a")  # 2 cached blocks in the LRU, 2 empty
    long = request("b", list(range(10, 19)) + list(range(30, 39)))  # 18 tokens: 5 blocks, 2 cached
    cached = kv.cached_prefix(long)
    assert len(cached) == 2 and not kv.admit(long, cached, 18)
    assert kv.pool.cached and list(kv.pool.lru) == cached[::-1] and "b" not in kv.block_tables


# --- the engine: outputs with the cache on equal outputs with it off ---------------------------------

F64 = {"dtype": torch.float64, "block_size": B}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


def engines(model_dir: str, **config):
    """The same engine twice: prefix caching on, and off."""
    on = make_engine(model_dir, **F64, **config)
    off = make_engine(model_dir, **F64, enable_prefix_caching=False, **config)
    assert on.kv.prefix_caching and not off.kv.prefix_caching
    return on, off


def conversations(engine, firsts: list[list[int]], users: list[list[list[int]]], params=GREEDY):
    """Conversations advanced in lockstep, each turn of all of them in one batch: a turn's prompt is the
    previous prompt, its answer and the next user message. Returns per turn the requests' outputs and
    cached tokens, and the finished requests."""
    prompts = firsts
    outputs, cached, finished = [], [], []
    for turn in range(len(users[0]) + 1):
        reqs = engine.generate(prompts, params)
        outputs.append([r.output_token_ids for r in reqs])
        cached.append([r.num_cached_tokens for r in reqs])
        finished.append(reqs)
        if turn < len(users[0]):
            prompts = [p + r.output_token_ids + u[turn] for p, r, u in zip(prompts, reqs, users)]
    return outputs, cached, finished


def expected_hit(previous: Request) -> int:
    """Tokens of the next turn found in the cache: the blocks of the previous request that were
    computed (all its tokens but the last answer token) and whose next token is known."""
    return (previous.num_tokens - 1) // B * B


def assert_no_block_leaked(engine) -> None:
    kv, pool = engine.kv, engine.kv.pool
    assert kv.block_tables == {} and kv.promised == {} and kv.draft_kv_tokens == {}
    assert all(r == 0 for r in pool.ref_cnt) and pool.num_free_blocks == pool.num_blocks
    assert set(pool.lru) | set(pool.empty_blocks) == set(range(pool.num_blocks))
    assert sorted(pool.lru) == sorted(pool.cached.values())
    assert all(pool.block_hash[b] == h for h, b in pool.cached.items())


def test_repeated_prefixes(tiny_llama_dir):
    system = tokens(30, seed=1)
    prompts = [system + tokens(5 + i, seed=10 + i) for i in range(4)]
    on, off = engines(tiny_llama_dir)
    cached_on = [on.generate([p], GREEDY)[0] for p in prompts]
    cached_off = [off.generate([p], GREEDY)[0] for p in prompts]
    assert [r.output_token_ids for r in cached_on] == [r.output_token_ids for r in cached_off]
    assert [r.num_cached_tokens for r in cached_on] == [0, 28, 28, 28]  # 7 blocks: token 28 is shared too
    assert [r.num_cached_tokens for r in cached_off] == [0, 0, 0, 0]
    again = on.generate([prompts[2]], GREEDY)[0]  # the whole prompt and answer are cached
    assert again.output_token_ids == cached_off[2].output_token_ids
    assert again.num_cached_tokens == (len(prompts[2]) - 1) // B * B
    assert on.kv.num_hit_tokens == 3 * 28 + again.num_cached_tokens
    assert on.kv.num_queried_tokens == sum(len(p) for p in prompts) + len(prompts[2])
    assert_no_block_leaked(on)


def test_interleaved_conversations(tiny_llama_dir):
    firsts = [tokens(9 + 3 * i, seed=20 + i) for i in range(3)]
    users = [[tokens(3 + t, seed=40 + 5 * i + t) for t in range(3)] for i in range(3)]
    on, off = engines(tiny_llama_dir, max_num_batched_tokens=16)  # chunked prompts as well
    out_on, cached_on, reqs = conversations(on, firsts, users)
    out_off, cached_off, _ = conversations(off, firsts, users)
    assert out_on == out_off
    assert cached_on[0] == [0, 0, 0] and all(c == 0 for turn in cached_off for c in turn)
    for turn in range(1, 4):
        assert cached_on[turn] == [expected_hit(r) for r in reqs[turn - 1]]
    assert_no_block_leaked(on)


def test_under_preemption(tiny_qwen3_dir):
    """A cache too small for the batch: requests are preempted, find their own blocks again, and the
    outputs do not change."""
    firsts = [tokens(20, seed=50 + i) for i in range(6)]
    users = [[tokens(4, seed=60 + i)] for i in range(6)]
    on, off = engines(tiny_qwen3_dir, num_blocks=30)
    out_on, _, reqs = conversations(on, firsts, users)
    out_off, _, _ = conversations(off, firsts, users)
    assert out_on == out_off
    assert on.scheduler.num_preemptions > 0 and off.scheduler.num_preemptions > 0
    first_admissions = sum(r.num_cached_tokens for turn in reqs for r in turn)
    assert on.kv.num_hit_tokens > first_admissions  # re-admitted requests hit their own blocks
    assert_no_block_leaked(on)


def test_n_choices_share_the_prompt_and_seeds_hold(tiny_llama_dir):
    prompt = tokens(23, seed=70)
    results = {}
    for name, engine in zip(("on", "off"), engines(tiny_llama_dir)):
        reqs = []
        for i in range(3):
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=5 + i, max_tokens=10, ignore_eos=True)
            reqs.append(engine.add_request(f"c-{i}", prompt, params))
        while engine.has_unfinished_requests():
            engine.step()
        results[name] = reqs
    assert [r.output_token_ids for r in results["on"]] == [r.output_token_ids for r in results["off"]]
    assert [r.num_cached_tokens for r in results["on"]] == [0, 20, 20]  # choices 1, 2 waited for choice 0


def test_aborts_leak_no_block(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, **F64, num_blocks=40)
    system = tokens(17, seed=80)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i in range(10):
        engine.add_request(f"r{i}", system + tokens(3 + i, seed=90 + i), params)
    for step in range(30):
        engine.step()
        if step in (3, 7, 12):  # the oldest running request and the newest waiting one
            running = engine.scheduler.running
            if running:
                engine.abort_request(running[0].request_id)
            if engine.scheduler.waiting:
                engine.abort_request(engine.scheduler.waiting[-1].request_id)
        if step == 5:
            engine.add_request("late", system + tokens(6, seed=99), params)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0 and engine.kv.num_hit_tokens > 0
    assert_no_block_leaked(engine)


@pytest.fixture(scope="module")
def trained_head(tiny_qwen3_dir, tmp_path_factory):
    """A head distilled on the first turns of the conversations and on prompts that share 32 tokens (so that
    drafts are often accepted on them), and those prompts."""
    firsts = [tokens(12, seed=100 + i) for i in range(3)]
    shared = tokens(32, seed=130)
    parted = [shared + tokens(6, seed=131 + i) for i in range(3)]
    path, _ = save_distilled_head(tmp_path_factory.mktemp("head"), tiny_qwen3_dir, firsts + parted, 60,
                                  max_tokens=24)
    return path, firsts, parted


def test_mtp_acceptance_after_a_hit_equals_acceptance_without_the_cache(tiny_qwen3_dir, trained_head):
    head, firsts, _ = trained_head
    users = [[tokens(3, seed=110 + i), tokens(5, seed=120 + i)] for i in range(len(firsts))]
    spec = {"mtp_head": head, "spec_draft_n_max": 2, "spec_adaptive": False}
    on, off = engines(tiny_qwen3_dir, **spec)
    assert on.kv.draft_kv
    out_on, cached_on, reqs_on = conversations(on, firsts, users)
    out_off, _, reqs_off = conversations(off, firsts, users)
    assert out_on == out_off
    assert all(c > 0 for c in cached_on[1] + cached_on[2])
    for turn_on, turn_off in zip(reqs_on, reqs_off):
        for a, b in zip(turn_on, turn_off):
            assert a.spec_stats.to_dict() == b.spec_stats.to_dict()
    assert on.spec_stats.num_accepted_tokens > 0
    assert_no_block_leaked(on)


def kv_at(engine, request_id: str, num_positions: int) -> list[torch.Tensor]:
    """K and V of every attention layer (the MTP layers' included) at a request's first positions."""
    table = engine.kv.block_tables[request_id]
    slots = torch.tensor([table[p // B] * B + p % B for p in range(num_positions)])
    out = []
    for layer in engine.runner.kv_caches:
        if layer is not None:
            out.extend(t.flatten(0, 1)[slots] for t in layer)
    return out


def test_mtp_after_prefixes_that_part_at_a_block_boundary(tiny_qwen3_dir, trained_head):
    """Prompts share 32 tokens (8 whole blocks), then differ: block 7's last MTP entry read token 32, so only
    7 blocks may be reused. After the hit, the KV of every layer, MTP included, and the drafting are what
    they are without the cache."""
    head, _, prompts = trained_head
    spec = {"mtp_head": head, "spec_draft_n_max": 3, "spec_adaptive": False}
    on, off = engines(tiny_qwen3_dir, **spec)
    first_on = on.generate([prompts[0]], GREEDY)[0]
    first_off = off.generate([prompts[0]], GREEDY)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    second_on = on.add_request("second", prompts[1], params)
    second_off = off.add_request("second", prompts[1], params)
    for _ in range(4):
        on.step()
        off.step()
    assert second_on.num_cached_tokens == 28 and second_off.num_cached_tokens == 0
    filled = on.kv.draft_kv_tokens["second"]
    assert filled == off.kv.draft_kv_tokens["second"] > 32
    for a, b in zip(kv_at(on, "second", filled), kv_at(off, "second", filled)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    while on.has_unfinished_requests() or off.has_unfinished_requests():
        on.step()
        off.step()
    assert second_on.output_token_ids == second_off.output_token_ids
    for a, b in ((first_on, first_off), (second_on, second_off)):
        assert a.spec_stats.to_dict() == b.spec_stats.to_dict()
    assert second_on.spec_stats.num_accepted_tokens > 0
    assert_no_block_leaked(on)


def test_hybrid_models_say_prefix_caching_is_off(tmp_path, caplog):
    caplog.set_level("INFO")
    engine = make_engine(make_tiny_qwen3_next(tmp_path), spec_draft_n_max=0)
    assert not engine.kv.prefix_caching
    assert "prefix caching off (hybrid model)" in engine.summary()
    assert "prefix caching off: the linear-attention layers' recurrent state" in caplog.text
    first, second = engine.generate([tokens(13, seed=140)] * 2, GREEDY)
    assert first.output_token_ids == second.output_token_ids and second.num_cached_tokens == 0


def test_chained_mtp_layers_say_prefix_caching_is_off(tiny_llama_dir, tmp_path):
    head = save_random_head(tmp_path, load_checkpoint(tiny_llama_dir).config, num_layers=2)
    engine = make_engine(tiny_llama_dir, mtp_head=head, spec_adaptive=False)
    assert len(engine.mtp.layers) == 2 and not engine.kv.prefix_caching
    assert "prefix caching off (chained MTP layers)" in engine.summary()


# --- through the server ---------------------------------------------------------------------------

SYSTEM = "The quick brown fox jumps over the lazy dog. " * 3


def test_cached_tokens_and_metrics_through_the_server(http):  # noqa: F811
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, **SERVER_GREEDY}
    before = scrape(http)
    first = http.post("/v1/chat/completions", json=body).json()["usage"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    second = sse_events(http.post("/v1/chat/completions", json=stream))[-2]["usage"]
    prompt = first["prompt_tokens"]
    hit = (prompt - 1) // 16 * 16  # the server's engine has blocks of 16
    assert prompt > 32 and hit > 0
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": hit}
    after = scrape(http)
    queries = "mtpserve_prefix_cache_queries_total"
    hits = "mtpserve_prefix_cache_hits_total"
    assert after[queries] - before.get(queries, 0) == 2 * prompt
    assert after[hits] - before.get(hits, 0) == hit
    # n = 2 on a new prompt: the second choice reuses the first's blocks, the prompt was not cached
    other = {**body, "messages": [{"role": "user", "content": SYSTEM + "Bye"}], "n": 2}
    both = http.post("/v1/chat/completions", json=other).json()["usage"]
    assert both["prompt_tokens_details"] == {"cached_tokens": 0}
    hit = (both["prompt_tokens"] - 1) // 16 * 16
    assert scrape(http)[hits] - after[hits] == hit  # the second choice's
    again = http.post("/v1/chat/completions", json=other).json()["usage"]
    assert again["prompt_tokens_details"] == {"cached_tokens": hit}


def test_prompts_are_cached_while_speculation_is_backed_off(tiny_qwen3_dir, trained_head):
    """A policy that drafts nothing (a large batch) parks the MTP inputs of decode steps, but a prompt's MTP
    KV is filled at once, so its blocks are cached and shared as soon as they are computed."""
    head, _, prompts = trained_head
    on, off = engines(tiny_qwen3_dir, mtp_head=head, spec_draft_n_max=2)
    for engine in (on, off):
        engine.policy.plan = lambda requests, batch_size, fused=False: [0] * len(requests)
    first, second = (on.generate([p], GREEDY)[0] for p in prompts[:2])
    assert on.spec_stats.num_draft_tokens == 0
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 28)
    assert [r.output_token_ids for r in (first, second)] == greedy_outputs(off, prompts[:2])
    assert_no_block_leaked(on)


def greedy_outputs(engine, prompts: list[list[int]]) -> list[list[int]]:
    return [engine.generate([p], GREEDY)[0].output_token_ids for p in prompts]


def test_reset_forgets_only_free_cached_blocks():
    kv = caching_manager(8)
    a = request("a", list(range(10, 19)))
    admit(kv, a)
    computed(kv, a, 9)
    b = request("b", list(range(30, 39)))
    admit(kv, b)
    computed(kv, b, 9)
    kv.free("a")
    kv.reset_prefix_cache()
    assert kv.cached_prefix(request("a2", list(range(10, 19)))) == []
    assert len(kv.cached_prefix(request("b2", list(range(30, 39))))) == 2  # b still holds its blocks
    assert kv.pool.num_free_blocks == 5 and not kv.pool.lru
