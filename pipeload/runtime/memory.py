"""Process memory figures and human-friendly byte sizes."""

from __future__ import annotations

import re

# Streamed groups read while one computes. One is enough to keep the disk busy when a group reads
# slower than it computes (each read is split into chunks on several threads, weights/io.py), and
# the ring is then two buffers: every further one is a group's bytes the budget cannot keep resident.
PREFETCH_DEPTH = 1

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss() -> int:
    """Peak resident set size (VmHWM) of this process in bytes."""
    return _status_kib("VmHWM") * 1024


def current_rss() -> int:
    """Current resident set size (VmRSS) of this process in bytes."""
    return _status_kib("VmRSS") * 1024


def _cgroup_room() -> int | None:
    """Bytes the memory cgroups this process is in (v1 or v2, up the hierarchy) still allow:
    the tightest limit minus what is charged, counting inactive page cache as reclaimable."""
    from pathlib import Path

    room = None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "memory":
            root, limit_f, usage_f, stat_key = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
        elif controllers == "":
            root, limit_f, usage_f, stat_key = Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"
        else:
            continue
        parts = [p for p in rel.split("/") if p]
        for k in range(len(parts), -1, -1):
            d = root.joinpath(*parts[:k])
            try:
                limit_s = (d / limit_f).read_text().strip()
                usage = int((d / usage_f).read_text())
                stat = dict(l.split() for l in (d / "memory.stat").read_text().splitlines() if len(l.split()) == 2)
            except (OSError, ValueError):
                continue
            if limit_s == "max" or int(limit_s) >= 1 << 60:
                continue
            free = int(limit_s) - usage + int(stat.get(stat_key, 0))
            room = free if room is None else min(room, free)
    return room


def available_memory() -> int:
    """Bytes this process could still take without swapping or an OOM kill: the kernel's
    MemAvailable, or less if a memory cgroup's limit leaves less."""
    with open("/proc/meminfo") as f:
        avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


AUTO_MARGIN_FRACTION = 0.10   # of what is available, left to the rest of the machine
AUTO_MIN_MARGIN = 256 << 20


def auto_budget() -> int:
    """memory_limit="auto": what this process holds now plus what is available, less a margin."""
    avail = available_memory()
    return current_rss() + max(0, avail - max(AUTO_MIN_MARGIN, int(AUTO_MARGIN_FRACTION * avail)))


def parse_size(value: str | int | float | None) -> int | None:
    """Bytes from "2GB", "1536MiB", "512 mb", 2_000_000_000, "auto" (auto_budget) or None;
    raises ValueError on nonsense."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_budget()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}: use e.g. '2GB', '1536MiB', 'auto' or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def format_bytes(n: float, round_up: bool = False) -> str:
    """'1.23 GB' style (powers of 1000, as disks and budgets are quoted). round_up: never below n
    (a budget to give: '1.00 GB' for 1.004 GB would not be enough)."""
    import math

    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{math.ceil(n) if round_up else n:.0f} {unit}"
            return f"{math.ceil(n * 100) / 100 if round_up else n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def runtime_files() -> set[str]:
    """Paths of the files this process runs from: every file mapped into it (/proc/self/maps:
    shared libraries, torch's among them) and every imported module's source and bytecode."""
    import sys

    files = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    for module in list(sys.modules.values()):
        for attr in ("__file__", "__cached__"):
            name = getattr(module, attr, None)
            if isinstance(name, str):
                files.add(name)
    return files


def release_runtime_cache() -> int:
    """Drop the page cache of the runtime's own files (runtime_files) that no mapping uses:
    what the kernel read around the pages of shared libraries it faulted in, and the modules
    read at import. A memory cgroup charges those pages to the process (torch's libraries
    alone leave 150-300 MB on a disk with 8 MB readahead); pages still mapped are kept and
    stay counted in RSS. Returns the number of files advised."""
    import os

    advised = 0
    for name in runtime_files():
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:  # gone, or not readable: nothing of ours to drop
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            advised += 1
        finally:
            os.close(fd)
    return advised
