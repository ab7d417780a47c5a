"""A least-recently-used cache bounded by the bytes its entries hold, not by their count.

Label hypotheses come from configuration and, where a topic allows it, from events: an
entry-count bound says nothing about memory when one entry can be a thousand times larger
than another. Thread-safe: ``prepare`` and ``classify`` run on different threads.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")

#: What one entry costs beyond its key and value (dict slot, linked-list node, object
#: headers), so that a flood of tiny entries is bounded too.
ENTRY_OVERHEAD = 200


class ByteBoundedCache(Generic[V]):
    """str → value; the least recently used entries go once the total passes ``max_bytes``.

    ``size(value)`` is the value's payload in bytes; the key's own size and
    :data:`ENTRY_OVERHEAD` are added. An entry larger than the whole budget is not kept.
    """

    def __init__(self, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size = size
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """The bytes held now (keys, values and per-entry overhead)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def values(self) -> Iterator[V]:
        with self._lock:
            values = [value for value, _ in self._entries.values()]
        return iter(values)

    def get(self, key: str) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, value: V) -> None:
        cost = sys.getsizeof(key) + self._size(value) + ENTRY_OVERHEAD
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if cost > self.max_bytes:
                return
            self._entries[key] = (value, cost)
            self._bytes += cost
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
