"""Process memory figures and human-friendly byte sizes."""

from __future__ import annotations

import re

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


def parse_size(value: str | int | float | None) -> int | None:
    """Bytes from "2GB", "1536MiB", "512 mb", 2_000_000_000 or None; raises ValueError on nonsense."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}: use e.g. '2GB', '1536MiB' or a number of bytes")
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
