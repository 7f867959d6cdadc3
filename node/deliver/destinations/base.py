"""What a destination type provides (one module of this package each, registered in __init__.py):
a session that sends a batch of queued deliveries and says which failures are worth retrying,
and how to open one from the destination's configuration.

The destination worker (node/deliver/worker.py) only ever sees this interface: it asks the
registry for a session, hands it due deliveries, and settles the results in the queue (backoff,
refusals, dead letters, metrics and log lines are the worker's, the same for every type).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.deliver.queue import Delivery


BATCH = 32  # a session's batch_size unless its type says otherwise


class DeliveryError(Exception):
    """The destination did not take the instance; `retryable` says whether trying later may help."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Delivered:
    """The destination has these, as durably as it can tell: the queue forgets them."""

    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True)
class Failed:
    """The destination did not take these, because of `error`."""

    deliveries: tuple[Delivery, ...]
    error: Exception


Result = Delivered | Failed


def describe_error(error: Exception) -> str:
    """The text recorded and logged for a failure: a DeliveryError says what happened itself;
    anything else (e.g. a file that cannot be read) is named by its type too."""
    return str(error) if isinstance(error, DeliveryError) else f"{type(error).__name__}: {error}"


class DestinationSession(Protocol):
    """One destination as its worker sees it. Only the worker's thread uses a session, from
    the worker's start to its stop; it may keep a connection open between batches. Subclassing
    this class gives the defaults below."""

    # Seconds the worker lets work gather after a batch smaller than it could take, so that
    # the next batch is fuller (a folder commits a batch as a group); 0: it does not wait.
    gather: float = 0.0
    # Deliveries handed to `deliver` at once, at most (it may look ahead: dicom.py proposes the
    # batch's SOP classes and syntaxes when it opens an association)
    batch_size: int = BATCH

    def deliver(self, batch: Sequence[Delivery], stopping: Callable[[], bool]) -> Iterator[Result]:
        """Send `batch`, in order, yielding each result as soon as it is final (a result may
        cover several deliveries; a delivery is in one result at most, and one that is in
        none stays due, for the next batch). Return before the next delivery once `stopping()`
        is true, and after a transient failure: the destination cannot take anything now."""
        ...

    def transient(self, error: Exception) -> bool:
        """Whether `error` means "not now" (the worker backs off and the whole destination
        waits; not counted against max_failures) rather than a refusal of these instances."""
        return isinstance(error, DeliveryError) and error.retryable

    def wait_at_least(self, error: Exception) -> float:
        """Seconds the destination asked to be left alone after `error` (HTTP Retry-After);
        the worker waits that long or its backoff, whichever is longer."""
        return float(getattr(error, "retry_after", None) or 0.0)

    def close_if_idle(self) -> None:
        """Nothing is due: release what has not been used for too long (an association)."""

    def close(self) -> None:
        """Release everything held: after a transient failure, and when the worker stops. The
        session may be used again; it opens what it needs then."""


@dataclass(frozen=True)
class DestinationType:
    """A registered destination type: the configuration class it serves (node/config/schema.py),
    how to open a session for one such destination, and, for a type that lays out files,
    where it puts a processed instance, worked out from the instance's dataset when it is
    queued (a delivery's `relpath`)."""

    config: type
    open: Callable[[Any], DestinationSession]
    relpath: Callable[[Any, Dataset], str] | None = None
