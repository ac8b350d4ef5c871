"""Text embeddings cached across requests, keyed by (checkpoint sha256, normalised prompt).

An LRU of `capacity` entries, plus pinned entries that are never evicted: the prompts of
registered prompt sets. Pins are reference counts (two sets may share a prompt) and may be
taken before the embedding exists (a set registered while the backend is down is pinned as
soon as it is first encoded). Values are read-only float32 [D] arrays. Single event loop, no
locks needed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np

CacheKey = tuple[str, str]  # (checkpoint sha256, normalised prompt)


class EmbeddingCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._lru: OrderedDict[CacheKey, np.ndarray] = OrderedDict()
        self._pinned: dict[CacheKey, np.ndarray] = {}
        self._pins: Counter[CacheKey] = Counter()

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._pinned or key in self._lru

    def get(self, key: CacheKey) -> np.ndarray | None:
        if (value := self._pinned.get(key)) is not None:
            return value
        value = self._lru.get(key)
        if value is not None:
            self._lru.move_to_end(key)
        return value

    def put(self, key: CacheKey, embedding: np.ndarray) -> None:
        value = np.array(embedding, dtype=np.float32, copy=True)
        value.setflags(write=False)
        if self._pins[key] > 0:
            self._pinned[key] = value
            self._lru.pop(key, None)
            return
        if self.capacity == 0:
            return
        self._lru[key] = value
        self._lru.move_to_end(key)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def pin(self, key: CacheKey) -> None:
        self._pins[key] += 1
        if key in self._lru:
            self._pinned[key] = self._lru.pop(key)

    def unpin(self, key: CacheKey) -> None:
        if self._pins[key] <= 0:
            return
        self._pins[key] -= 1
        if self._pins[key] == 0:
            del self._pins[key]
            value = self._pinned.pop(key, None)
            if value is not None:
                self.put(key, value)
