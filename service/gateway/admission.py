"""Admission control: bounded work in flight, and 429 with Retry-After at once past a limit.

Four budgets are shared by every scoring request (`/v1/score`, `/v1/score/group`):

- `requests`: requests admitted at once (`max_requests_in_flight`);
- `body_bytes`: their request bodies (`max_body_bytes_in_flight`), reserved from
  `Content-Length` before a byte of the body is read (else as it streams in);
- `images`: their images (`max_images_in_flight`), reserved once the body is parsed;
- `decoded_bytes`: their decoded pixels, H × W × 3 (`max_decoded_bytes_in_flight`), reserved
  from each image's header (or a raw tensor's shape) before it is decoded.

A reservation that does not fit is refused at once (`Overloaded` → 429 with Retry-After),
never queued: the gateway's memory and queue stay bounded whatever the clients send. Everything
a request reserved is released when its response has been sent (`Ticket.release`). Each budget
is at least what one maximal request needs, so a lone request is never refused. Reservations
can come from the decoding threads, hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.gateway.errors import ApiError
from service.gateway.metrics import GatewayMetrics

BUDGETS = ("requests", "body_bytes", "images", "decoded_bytes")
_SETTING = {
    "requests": "max_requests_in_flight",
    "body_bytes": "max_body_bytes_in_flight",
    "images": "max_images_in_flight",
    "decoded_bytes": "max_decoded_bytes_in_flight",
}


class Overloaded(ApiError):
    """A budget is full: 429 with Retry-After (the client retries later, with the same id)."""

    def __init__(self, budget: str, wanted: int, in_use: int, limit: int, retry_after_s: int):
        super().__init__(
            429,
            "overloaded",
            f"the gateway is at its limit of {limit} {budget.replace('_', ' ')} in flight "
            f"({_SETTING[budget]}; {in_use} in use, this request needs {wanted} more): "
            f"retry after {retry_after_s} s",
            limit=limit,
            headers={"Retry-After": str(retry_after_s)},
        )
        self.budget = budget
        self.details = [{"cause": f"{budget}_in_flight", "in_use": in_use, "wanted": wanted}]


class RequestFinished(RuntimeError):
    """A reservation for a request whose ticket was already released (it was cancelled)."""


@dataclass
class Ticket:
    """What one request holds; `release` gives it all back (idempotent)."""

    admission: Admission
    held: dict[str, int] = field(default_factory=dict)
    released: bool = False
    streamed: bool = False  # no Content-Length: body bytes are reserved as they arrive

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, budget: str, amount: int) -> None:
        """Take `amount` more of `budget`, or raise Overloaded (taking nothing). A decoding
        thread may still reserve after its request ended (cancelled): that is refused, so
        nothing is held by a released ticket."""
        with self._lock:
            if self.released:
                raise RequestFinished("the request ended before its images were decoded")
            self.admission.take(budget, amount)
            self.held[budget] = self.held.get(budget, 0) + amount

    def release(self) -> None:
        with self._lock:
            if not self.released:
                self.released = True
                self.admission.give_back(self.held)


class Admission:
    """The shared budgets; `admit` opens a request's Ticket."""

    def __init__(self, limits: dict[str, int], metrics: GatewayMetrics, retry_after_s: int) -> None:
        unknown = set(limits) - set(BUDGETS)
        if unknown:
            raise ValueError(f"unknown admission budgets: {sorted(unknown)}")
        self.limits = {name: int(limits[name]) for name in BUDGETS}
        self.in_use = dict.fromkeys(BUDGETS, 0)
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        for name, limit in self.limits.items():
            metrics.admission_limit.labels(name).set(limit)
            metrics.admission_in_use.labels(name).set(0)

    @classmethod
    def from_settings(cls, settings, metrics: GatewayMetrics) -> Admission:
        """Budgets from the settings, each raised to what one maximal request needs."""
        limits = {
            "requests": settings.max_requests_in_flight,
            "body_bytes": max(settings.max_body_bytes_in_flight, settings.max_request_bytes),
            "images": max(settings.max_images_in_flight, settings.max_items_per_request),
            "decoded_bytes": max(
                settings.max_decoded_bytes_in_flight, 3 * settings.max_request_pixels
            ),
        }
        return cls(limits, metrics, settings.overload_retry_after_s)

    def take(self, budget: str, amount: int) -> None:
        with self._lock:
            in_use, limit = self.in_use[budget], self.limits[budget]
            if amount > 0 and in_use + amount > limit:
                self.metrics.refusals.labels(f"{budget}_in_flight").inc()
                raise Overloaded(budget, amount, in_use, limit, self.retry_after_s)
            self.in_use[budget] = in_use + amount
            self.metrics.admission_in_use.labels(budget).set(in_use + amount)

    def give_back(self, held: dict[str, int]) -> None:
        with self._lock:
            for budget, amount in held.items():
                self.in_use[budget] -= amount
                self.metrics.admission_in_use.labels(budget).set(self.in_use[budget])

    def admit(self, body_bytes: int = 0) -> Ticket:
        """A ticket holding one request slot and `body_bytes` (Content-Length), or Overloaded."""
        ticket = Ticket(self)
        ticket.reserve("requests", 1)
        try:
            ticket.reserve("body_bytes", body_bytes)
        except Overloaded:
            ticket.release()
            raise
        return ticket
