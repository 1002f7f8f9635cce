"""What a process costs, read from /proc: CPU seconds, RSS now and at peak; and machine load.

The dispatcher runs as a child process for the CPU and memory figures, so these numbers
are its own, separate from the emulator's and the benchmark driver's.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process: CPU seconds (user + system), RSS and peak RSS in MiB."""

    at: float
    cpu_seconds: float
    rss_mib: float
    peak_rss_mib: float
    threads: int


def sample(pid: int) -> ProcSample:
    """Read ``/proc/<pid>/stat`` and ``/proc/<pid>/status`` once."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces: fields start after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    status: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return ProcSample(
        at=time.monotonic(),
        cpu_seconds=(utime + stime) / _TICKS,
        rss_mib=_kib(status.get("VmRSS", "0 kB")) / 1024,
        peak_rss_mib=_kib(status.get("VmHWM", "0 kB")) / 1024,
        threads=int(status.get("Threads", "0")),
    )


def _kib(value: str) -> int:
    return int(value.split(maxsplit=1)[0])


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Machine-wide CPU jiffies (all cores) from /proc/stat: busy and total."""

    busy: int
    total: int


def machine_cpu() -> CpuTimes:
    """One reading of the first line of /proc/stat."""
    line = Path("/proc/stat").read_text().splitlines()[0]
    values = [int(v) for v in line.split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return CpuTimes(busy=total - idle, total=total)


@dataclass(frozen=True)
class LoadWindow:
    """How busy the machine was over a scenario, and how much of that was ours."""

    seconds: float
    machine_busy_cores: float  # average cores busy, all processes
    ours_busy_cores: float  # average cores used by our processes (driver, emulator, dispatcher)
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]

    @property
    def others_busy_cores(self) -> float:
        """Average cores used by processes that are not part of this benchmark."""
        return max(0.0, self.machine_busy_cores - self.ours_busy_cores)


class LoadMeter:
    """Measures machine load between ``start`` and ``stop`` and the share of ``pids``."""

    def __init__(self) -> None:
        self._began = time.monotonic()
        self._cpu = machine_cpu()
        self._load = os.getloadavg()
        self._ours: dict[int, float] = {}

    def track(self, pid: int) -> None:
        """Count ``pid``'s CPU from now on as ours (call before it does work)."""
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            self._ours[pid] = sample(pid).cpu_seconds

    def stop(self, final: dict[int, float] | None = None) -> LoadWindow:
        """The load since construction; ``final`` gives CPU seconds of pids already gone."""
        seconds = time.monotonic() - self._began
        cpu = machine_cpu()
        ours = 0.0
        for pid, began in self._ours.items():
            try:
                now = sample(pid).cpu_seconds
            except (FileNotFoundError, ProcessLookupError):
                now = (final or {}).get(pid, began)
            ours += now - began
        elapsed_jiffies = cpu.total - self._cpu.total
        busy_cores = (
            (cpu.busy - self._cpu.busy) / elapsed_jiffies * (os.cpu_count() or 1)
            if elapsed_jiffies > 0
            else 0.0
        )
        return LoadWindow(
            seconds=round(seconds, 3),
            machine_busy_cores=round(busy_cores, 3),
            ours_busy_cores=round(ours / max(seconds, 1e-9), 3),
            load_average_before=self._load,
            load_average_after=os.getloadavg(),
        )
