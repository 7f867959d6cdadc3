"""The Storage SCP's open connections, counted from the moment a socket is accepted until the
moment it is known to be closed (EOF, reset, an unreadable first PDU, or the node closing it).

pynetdicom's own count is its association threads, and a thread whose peer closed before it
sent an A-ASSOCIATE-RQ (a port scanner, a load balancer's TCP health check) lives on until
the ACSE timeout: 64 such probes locked every modality out for 30 s. Counting connections
here, by their close event, frees a slot the moment the node can know it is free.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable
from typing import NamedTuple


class Refusal(NamedTuple):
    limit: str  # the metric's reason: max-connections or max-connections-per-address
    why: str


class ConnectionSlots:
    """Open connections by peer address, within a total and a per-address limit."""

    def __init__(self, still_open: Callable[[Hashable], bool] = lambda key: True):
        # still_open: a last resort for a connection whose close event never came (its
        # thread ended some other way); asked only when a limit is reached.
        self._still_open = still_open
        self._open: dict[Hashable, str] = {}
        self._lock = threading.Lock()

    def admit(self, key: Hashable, address: str, limit: int, per_address: int) -> Refusal | None:
        """Count a new connection from `address`, or say why it must be closed at once."""
        with self._lock:
            refusal = self._refusal(address, limit, per_address)
            if refusal:  # a connection whose close event never came may be what fills it
                self._open = {k: a for k, a in self._open.items() if self._still_open(k)}
                refusal = self._refusal(address, limit, per_address)
            if refusal is None:
                self._open[key] = address
            return refusal

    def _refusal(self, address: str, limit: int, per_address: int) -> Refusal | None:
        if len(self._open) >= limit:
            why = f"{len(self._open)} open, limits.max_connections is {limit}"
            return Refusal("max-connections", why)
        same = sum(1 for a in self._open.values() if a == address)
        if same >= per_address:
            why = f"{same} open from it, limits.max_connections_per_address is {per_address}"
            return Refusal("max-connections-per-address", why)
        return None

    def release(self, key: Hashable) -> None:
        with self._lock:
            self._open.pop(key, None)

    def by_address(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(self._open.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
