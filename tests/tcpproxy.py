"""A TCP proxy that can cut every connection through it: a network failure, or a server
restart as its clients see it, without stopping the real server other tests share."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cuts = 0
        self.accepted = 0  # connections let through
        self.forwarded = 0  # bytes, both ways
        self.rate: float | None = None  # bytes per second each way; None: as they come
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._refusing = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self.accepted += 1
        pair = (client_w, server_w)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536 if self.rate is None else 8192):
                writer.write(data)
                await writer.drain()
                self.forwarded += len(data)
                if self.rate is not None:
                    await asyncio.sleep(len(data) / self.rate)
        writer.close()

    async def cut(self, down_for: float = 0.0) -> None:
        """Drop every open connection; refuse new ones for `down_for` seconds."""
        self.cuts += 1
        self._refusing = True
        for client_w, server_w in list(self._pairs):
            client_w.transport.abort()
            server_w.transport.abort()
        await asyncio.sleep(down_for)
        self._refusing = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client_w, server_w in list(self._pairs):
            client_w.transport.abort()
            server_w.transport.abort()
