"""The machine a benchmark ran on: cores, CPU model, memory, Python, emulator version, load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from devtools.sandbox import find_executable
from dispatcher import __version__ as dispatcher_version


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ('unknown' when it is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_mib() -> int:
    """Total memory in MiB from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def emulator_version() -> str:
    """The installed MiniStack version, asked of the emulator's own interpreter."""
    executable = find_executable()
    python = executable.parent / "python"
    if not python.exists():
        return "unknown"
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('ministack'))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"ministack {out.stdout.strip()}"


def uptime() -> str:
    """The ``uptime`` line (load averages), as a human would read it."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def machine_info() -> dict[str, Any]:
    """Everything needed to judge the numbers: hardware, software, and the load right now."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_mib": memory_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "emulator": emulator_version(),
        "dispatcher": dispatcher_version,
        "uptime": uptime(),
    }
