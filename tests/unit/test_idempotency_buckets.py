"""The idempotency store's buckets on a Redis Cluster: where keys go (construction only, nothing
connects here). Slots are computed by redis-py's `key_slot` (CRC16 of the hash tag), not by
the code under test."""
from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from afc.runtime.idempotency import BUCKET_TAGS, BUCKETS, RedisStore, bucket_of

SLOTS = 16384
CLUSTER = "redis+cluster://127.0.0.1:1/0"        # never connected to in these tests


def store(url: str = CLUSTER, prefix: str = "app", group: str = "orders") -> RedisStore:
    return RedisStore(url, prefix, group, "owner-1", 30_000, 3600)


def test_each_bucket_tag_sits_in_the_middle_of_its_own_share_of_the_slots() -> None:
    width = SLOTS / BUCKETS
    slots = [key_slot(t.encode()) for t in BUCKET_TAGS]
    for i, s in enumerate(slots):
        assert i * width <= s < (i + 1) * width, (i, BUCKET_TAGS[i], s)
        assert abs(s - (i + 0.5) * width) < 64, (i, s)
    assert len(set(slots)) == BUCKETS


@pytest.mark.parametrize("masters", [1, 2, 3, 4, 6])
def test_buckets_split_exactly_over_evenly_sliced_masters(masters: int) -> None:
    """`redis-cli --cluster create` gives each of m masters an equal run of slots (3 masters:
    0-5460, 5461-10922, 10923-16383): 12 buckets split exactly over 1, 2, 3, 4 or 6."""
    per = SLOTS / masters
    ranges = [(round(m * per), round((m + 1) * per) - 1) for m in range(masters)]
    per_master = Counter(next(m for m, (lo, hi) in enumerate(ranges) if lo <= key_slot(t.encode()) <= hi)
                         for t in BUCKET_TAGS)
    assert sorted(per_master.values()) == [BUCKETS // masters] * masters


def test_bucket_of_a_key_is_pinned_and_keys_spread_evenly() -> None:
    # Pinned: a change of the hash would move every claim and done mark of every deployment.
    assert [bucket_of(k) for k in ("order-1", "order-2", "a", "", "~YWJj")] == [7, 9, 3, 0, 3]
    counts = Counter(bucket_of(f"order-{i}") for i in range(16_000))          # ~1,333 each
    assert set(counts) == set(range(BUCKETS))
    assert all(1100 <= c <= 1560 for c in counts.values()), counts


def test_cluster_keys_carry_the_bucket_tag_and_share_its_slot() -> None:
    s = store()
    for key in ("order-1", "order-2", "x{y}z", "~YWJj"):
        tag = s.hash_tag(key)
        assert tag == "{" + BUCKET_TAGS[bucket_of(key)] + "}"
        full = s.full_key(key)
        assert full == f"app:idem:orders:{tag}:{key}"
        assert key_slot(full.encode()) == key_slot(tag[1:-1].encode())
        # a user's effect key named with the tag lands in the claim's slot (mark_done_in's rule)
        assert key_slot(f"effects:{tag}:{key}".encode()) == key_slot(full.encode())


def test_single_redis_names_are_unchanged() -> None:
    s = store("redis://127.0.0.1:1/0")
    assert s.full_key("order-1") == "app:idem:orders:order-1"
    assert s.hash_tag("order-1") == ""


@pytest.mark.parametrize("prefix,group", [("a{b", "g"), ("app", "g{1}")])
def test_a_brace_in_prefix_or_group_is_refused_on_a_cluster(prefix: str, group: str) -> None:
    with pytest.raises(ValueError, match="may not contain"):
        store(prefix=prefix, group=group)
    store("redis://127.0.0.1:1/0", prefix, group)             # one Redis: as before
