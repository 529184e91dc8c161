"""CPU used during a measured phase by this process and by our own PostgreSQL backends.

throughput.cpu_snapshot() sums every postgres process on the machine: when other work opens
and closes connections during the phase, their ticks come and go and the postgres figure
can even turn negative. Here only the backends serving our database count (found through
pg_stat_activity at the start and at the end of the phase), and "other" is the rest of the
machine's busy time: the noise from work that is not ours.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _machine_busy() -> float:
    numbers = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(numbers[:8]) - numbers[3] - numbers[4]) / CLK_TCK


async def _backends(conn: asyncpg.Connection, database: str) -> dict[int, int]:
    pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    found = {}
    for r in pids:
        ticks = _ticks(r["pid"])
        if ticks is not None:
            found[r["pid"]] = ticks
    return found


@dataclass
class CpuMeter:
    """with-less meter: `await start()`, the work, `await stop()`; then the figures."""

    conn: asyncpg.Connection  # a connection to read pg_stat_activity through
    database: str
    procs: list[int] = field(default_factory=list)  # more processes to count (e.g. a server)
    seconds: float = 0.0
    py: float = 0.0  # CPU seconds of this process
    pg: float = 0.0  # of our PostgreSQL backends
    extra: float = 0.0  # of `procs`
    machine: float = 0.0  # busy CPU seconds of the whole machine

    async def start(self) -> None:
        self._pg0 = await _backends(self.conn, self.database)
        self._extra0 = {pid: _ticks(pid) or 0 for pid in self.procs}
        self._py0 = time.process_time()
        self._m0 = _machine_busy()
        self._t0 = time.perf_counter()

    async def stop(self) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.py = time.process_time() - self._py0
        self.machine = _machine_busy() - self._m0
        pg1 = await _backends(self.conn, self.database)
        self.pg = sum(t - self._pg0.get(pid, 0) for pid, t in pg1.items()) / CLK_TCK
        self.extra = sum((_ticks(pid) or 0) - t0 for pid, t0 in self._extra0.items()) / CLK_TCK

    @property
    def other_cores(self) -> float:
        busy = self.machine - self.py - self.pg - self.extra
        return max(0.0, busy / self.seconds) if self.seconds else 0.0

    def cores(self) -> str:
        s = self.seconds or 1.0
        text = f"py {self.py / s:.2f}  pg {self.pg / s:.2f}"
        if self.procs:
            text += f"  sut {self.extra / s:.2f}"
        return text + f"  other {self.other_cores:.2f} cores"
