"""Block pool and KV cache manager, without a model."""

import pytest

from mtpserve.engine.kv_cache import BlockPool, KVCacheManager


def test_pool_allocate_free_refcount():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free_blocks == 1
    assert pool.allocate(2) is None and pool.num_free_blocks == 1  # nothing taken on failure
    pool.incref(a[0])
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.ref_cnt[a[0]] == 1
    pool.free([a[0]])
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0
    with pytest.raises(ValueError):
        pool.free([a[0]])
    with pytest.raises(ValueError):
        pool.incref(a[1])


def test_manager_grows_tables_and_slots():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 5)
    assert len(kv.block_tables["a"]) == 2
    assert kv.allocate_slots("a", 8) and len(kv.block_tables["a"]) == 2
    assert kv.allocate_slots("a", 9) and len(kv.block_tables["a"]) == 3
    table = kv.block_tables["a"]
    assert len(set(table)) == 3  # distinct blocks, each held once by this request
    assert all(kv.pool.ref_cnt[b] == 1 for b in table) and kv.num_free_blocks == 5
    assert kv.allocate_slots("a", 9) and kv.block_tables["a"] is table  # growing keeps the table
    assert kv.allocate_slots("b", 20)  # 5 blocks: 3 + 5 = 8
    assert not kv.allocate_slots("c", 1)
    assert "c" not in kv.block_tables
    assert not kv.allocate_slots("a", 13)  # would need a 4th block
    assert len(kv.block_tables["a"]) == 3  # unchanged on failure
    kv.trim("b", 9)
    assert len(kv.block_tables["b"]) == 3 and kv.num_free_blocks == 2
    kv.free("a")
    kv.free("b")
    kv.free("missing")
    assert kv.num_free_blocks == 8 and kv.block_tables == {}


def test_blocks_needed():
    kv = KVCacheManager(num_blocks=1, block_size=16)
    assert [kv.blocks_needed(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
