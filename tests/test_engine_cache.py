"""The engines' label caches: least recently used first, bounded by bytes."""

from __future__ import annotations

import sys

from stream_classifier.engine.cache import ENTRY_OVERHEAD, ByteBoundedCache


def cost(key: str, value: bytes) -> int:
    return sys.getsizeof(key) + len(value) + ENTRY_OVERHEAD


def test_least_recently_used_entries_go_first_once_past_the_byte_budget() -> None:
    value = b"x" * 1000
    cache: ByteBoundedCache[bytes] = ByteBoundedCache(3 * cost("a", value), len)
    for key in "abc":
        cache.put(key, value)
    assert cache.get("a") == value  # now the most recently used
    cache.put("d", value)
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.nbytes == 3 * cost("a", value) <= cache.max_bytes


def test_an_entry_larger_than_the_whole_budget_is_not_kept() -> None:
    cache: ByteBoundedCache[bytes] = ByteBoundedCache(10_000, len)
    cache.put("small", b"x" * 100)
    cache.put("huge", b"x" * 20_000)
    assert "huge" not in cache and "small" in cache
    cache.put("small", b"y" * 200)  # replacing an entry counts it once
    assert cache.get("small") == b"y" * 200 and cache.nbytes == cost("small", b"y" * 200)
