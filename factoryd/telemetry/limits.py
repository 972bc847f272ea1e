"""Request-rate limits for the station's HTTP endpoints (API, station page, ``/metrics``): token buckets.

A client past its rate gets an answer at once (429 with ``Retry-After``), never a queue: a flood of
scrapes or page reloads must not take the event loop, the ledger or memory from provisioning.
The number of tracked clients is bounded; the least recently seen is forgotten first.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Distinct clients (IP addresses, credentials) remembered at once; a spray of fake ones only evicts.
MAX_TRACKED_CLIENTS = 4096

# Told of every request refused for load: (endpoint, HTTP status) -> a counter (metrics).
RejectListener = Callable[[str, int], None]


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per client key: ``rate_per_s`` sustained, ``burst`` at once (thread-safe)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_keys: int = MAX_TRACKED_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError(f"bad token bucket: rate {rate_per_s}/s, burst {burst}, keys {max_keys}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def peek(self, key: str) -> float:
        """The seconds until ``key`` has a token (0.0: one is there now), without spending it."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return 0.0
            tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate_per_s)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 when allowed, else the seconds until the next token."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(key, None)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
                while len(self._buckets) >= self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate_per_s)
                bucket.at = now
            self._buckets[key] = bucket
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate_per_s


def retry_after_header(wait_s: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait."""
    return str(max(1, math.ceil(wait_s)))
