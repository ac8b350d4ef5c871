"""`AsyncRewardClient`: `RewardClient`'s interface for asyncio (httpx.AsyncClient), driving the
same flows (`core.py`). Image encoding runs in the client's thread pool, off the event loop;
at most `max_concurrency` requests of all calls together are in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

import httpx

from textnorm_reward_client.client import _ClientBase
from textnorm_reward_client.core import Flow, NotSent, Send, Sleep, T, Undecodable
from textnorm_reward_client.results import GroupResult, ScoreResult, ServiceLimits


class AsyncRewardClient(_ClientBase):
    """async with AsyncRewardClient("http://reward:8000", api_key=KEY) as client:
    result = await client.score(images, prompts)
    """

    _OWN_INPUTS = True  # a call's inputs are read when it is made, not when it is awaited

    def _make_http(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the running loop
        limits = httpx.Limits(max_connections=max(self.max_concurrency, 10))
        return httpx.AsyncClient(
            headers=self.headers, timeout=self._core.timeout_s, transport=transport, limits=limits
        )

    async def _send(self, send: Send) -> httpx.Response | httpx.TransportError:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        # Waiting for one of this client's own slots is not the server's doing: only the
        # call's deadline bounds it (NotSent past it), and the attempt's timeout starts once
        # it holds a slot.
        try:
            await asyncio.wait_for(self._slots.acquire(), send.wait_limit())
        except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (the client runs on 3.10)
            return NotSent(f"the call's deadline passed while all {self.max_concurrency} "
                           "of this client's connections were busy")  # fmt: skip
        try:
            # httpx's timeout applies per phase (connect, write, each read): a server that
            # trickles its answer could hold one attempt past its limit, so the attempt as a
            # whole is cut at `timeout_now()` (timeout_s, or what the call's deadline leaves).
            limit = send.timeout_now()
            try:
                return await asyncio.wait_for(self._request(send), limit)
            except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (3.10)
                return httpx.TimeoutException(f"no complete answer within {limit:.3g} s")
        finally:
            self._slots.release()

    async def _request(self, send: Send) -> httpx.Response | httpx.TransportError:
        try:
            return await self._http.request(send.method, send.url, **self._request_args(send))
        except httpx.TransportError as exc:
            return exc
        except httpx.DecodingError as exc:
            return Undecodable(f"the answer could not be decoded: {exc}")

    async def _drive(self, flow: Flow[T]) -> T:
        outcome: Any = None
        try:
            while True:
                action = flow.send(outcome)
                if isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                    outcome = None
                else:
                    outcome = await self._send(action)
        except StopIteration as done:
            return done.value

    async def _drive_all(self, flows: list[Flow[T]]) -> list[T]:
        tasks = [asyncio.ensure_future(self._drive(f)) for f in flows]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def _execute(self, call: Any) -> Any:
        call.use(await self._drive(self._core.service_limits(call.deadline)))
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._encoder, call.encode, i) for i in range(call.size)]
        wire = list(await asyncio.gather(*jobs))  # off the event loop, even for one image
        return call.merge(await self._drive_all(call.requests(wire)))

    def score(
        self,
        images: Any,
        prompts: str | Sequence[str],
        textnorm: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        deadline_s: float | None = None,
    ) -> Coroutine[Any, Any, ScoreResult]:
        """See `RewardClient.score`; await the result. The inputs are read (tensors copied to
        host memory) when this is called, so the caller may reuse them before awaiting."""
        call = self._core.score_call(
            images, prompts, textnorm=textnorm, request_id=request_id, deadline_s=deadline_s
        )
        return self._execute(call)

    def score_group(
        self,
        prompt: str,
        images: Any,
        advantages: bool = True,
        *,
        textnorm: dict[str, Any] | None = None,
        advantage_of: str = "textnorm",
        advantage_eps: float = 1e-6,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> Coroutine[Any, Any, GroupResult]:
        """See `RewardClient.score_group`."""
        call = self._core.group_call(
            prompt, images, textnorm=textnorm, advantages=advantages,
            advantage_of=advantage_of, advantage_eps=advantage_eps,
            request_id=request_id, deadline_s=deadline_s,
        )  # fmt: skip
        return self._execute(call)

    async def register_prompt_set(self, prompt: str, contrastive: Sequence[str]) -> str:
        return await self._drive(
            self._core.register_prompt_set(prompt, contrastive, self._core.call_deadline())
        )

    async def models(self) -> dict[str, Any]:
        return await self._drive(self._core.models(self._core.call_deadline()))

    async def limits(self) -> ServiceLimits:
        return await self._drive(self._core.service_limits(self._core.call_deadline()))

    async def aclose(self) -> None:
        await self._http.aclose()
        self._encoder.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
