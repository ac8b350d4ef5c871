"""A loopback TCP proxy that delays the bytes passing through it (a slow network, for tests).

    with DelayProxy(upstream=("127.0.0.1", triton_grpc_port)) as proxy:
        gateway --triton-url 127.0.0.1:{proxy.port}
        proxy.set_delay(latency_s=0.2, jitter_s=0.1)   # each chunk, each direction
        proxy.set_delay(0, 0)                          # back to a fast network

The real bytes pass through unchanged (HTTP/2 gRPC frames here): nothing is parsed or mocked.
Every chunk read from one side is written to the other `latency_s + uniform(0, jitter_s)`
seconds later, never before the chunk that came before it (the order of a TCP stream is kept,
so jitter stretches the stream instead of reordering it). The delay applies to chunks read
after `set_delay`. The proxy runs its own event loop on a daemon thread, so the load generator
of the same process cannot slow it down. A connection whose upstream cannot be reached (Triton
down) is closed at once, as a refused connection would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from types import TracebackType

CHUNK_BYTES = 64 * 1024


class DelayProxy:
    """Forward `127.0.0.1:port` → `upstream`, delaying each chunk; start()/stop() or `with`."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        jitter_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        self.host = host
        self._port = port
        self.latency_s, self.jitter_s = latency_s, jitter_s
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.connections = 0  # accepted so far
        self.refused = 0  # closed because the upstream could not be reached
        self.bytes_forwarded = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """`host:port` (tritonclient style) to give the gateway instead of Triton's."""
        return f"{self.host}:{self._port}"

    def set_delay(self, latency_s: float, jitter_s: float = 0.0) -> None:
        self.latency_s, self.jitter_s = float(latency_s), float(jitter_s)

    def _delay(self) -> float:
        return self.latency_s + (self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> DelayProxy:
        if self._port == 0:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self._port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self._port)
        self._ready.set()
        async with self._server:
            await self._stopped.wait()
            self._server.close()
            await self._server.wait_closed()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType
    ) -> None:
        self.stop()

    # -- one connection ------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self.refused += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read chunks as they come; a second task writes each at its due time, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                last_due = max(last_due, time.monotonic() + self._delay())
                await queue.put((last_due, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
