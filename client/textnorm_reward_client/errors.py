"""The one exception every client raises when a call cannot be scored."""

from __future__ import annotations

from typing import Any


class RewardServiceError(RuntimeError):
    """A call that could not be scored: never a silent None.

    status: the HTTP status of the last answer, or None when no answer came (the service was
        unreachable after every retry, or the call's deadline passed first).
    error: the service's JSON `error` block ({"code", "message", "field", "limit"}); client-side
        failures use the codes "unreachable", "deadline_exceeded", "mixed_provenance" and
        "advantage_unavailable".
    body: the whole error body; request_id: the request's id; attempts: tries made.
    """

    def __init__(
        self,
        status: int | None,
        body: dict[str, Any],
        *,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        error = error if isinstance(error, dict) else {"message": str(error)}
        message = error.get("message", body)
        prefix = f"HTTP {status}" if status is not None else error.get("code", "error")
        super().__init__(f"{prefix}: {message}")
        self.status, self.error, self.body = status, error, body
        self.request_id = request_id or (body.get("request_id") if isinstance(body, dict) else None)
        self.attempts = attempts

    @property
    def code(self) -> str | None:
        return self.error.get("code")

    def __reduce__(self) -> tuple:
        # Rebuilt from the constructor's arguments, so the error crosses process boundaries
        # (multiprocessing, concurrent.futures) as itself instead of breaking the pool.
        args = (type(self), self.status, self.body, self.request_id, self.attempts)
        return (_rebuild, args, self.__dict__)  # state: attributes set later (last_error)


def _rebuild(
    cls: type[RewardServiceError],
    status: int | None,
    body: dict[str, Any],
    request_id: str | None,
    attempts: int,
) -> RewardServiceError:
    return cls(status, body, request_id=request_id, attempts=attempts)


def client_error(code: str, message: str, **kwargs: Any) -> RewardServiceError:
    """A failure found on the client's side (no HTTP answer to report)."""
    return RewardServiceError(None, {"error": {"code": code, "message": message}}, **kwargs)
