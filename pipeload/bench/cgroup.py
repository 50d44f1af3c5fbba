"""Running a benchmark child inside a memory cgroup (cgroup v1), the way a small machine feels it.

The memory controller charges the child's anonymous memory and the page cache of every file it
reads or maps (model files, torch's shared libraries), so a run that fits its budget here fits on
a machine of that size. `run_in_cgroup` starts the child already inside a fresh group (the pid is
written into `tasks` before exec), waits, and reports the group's peak charge
(`memory.max_usage_in_bytes`), how often the limit was reached (`memory.failcnt`: the kernel then
reclaimed cache to stay under it) and whether the OOM killer fired. With `read_bps` the child
is also put in a blkio group whose reads from the model's disk are throttled to that rate
(`blkio.throttle.read_bps_device`, O_DIRECT and buffered alike): a slower disk, such as a
Raspberry Pi's NVMe, USB SSD or SD card, simulated on this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
CGROUP_BLKIO = Path("/sys/fs/cgroup/blkio")


@dataclass
class CgroupRun:
    result: dict | None        # the child's last JSON line (None if it was killed or failed)
    max_usage: int             # peak bytes charged to the group (anonymous + page cache)
    limit: int | None          # the limit the group had (None: none)
    limit_hits: int            # memory.failcnt
    oom_killed: bool
    returncode: int
    stderr: str


def available() -> bool:
    """Whether memory cgroups can be made here (cgroup v1 mounted, writable: root)."""
    return CGROUP_MEMORY.is_dir() and os.access(CGROUP_MEMORY, os.W_OK)


def block_device(path: str | os.PathLike) -> str:
    """'MAJOR:MINOR' of the whole disk holding `path` (a partition's parent: throttles apply to disks)."""
    dev = os.stat(path).st_dev
    name = f"{os.major(dev)}:{os.minor(dev)}"
    sysfs = Path("/sys/dev/block") / name
    if (sysfs / "partition").exists():
        name = (sysfs.resolve().parent / "dev").read_text().strip()
    return name


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def run_in_cgroup(code: str, args: list, limit: int | None, timeout: float = 3600,
                  env: dict | None = None, read_bps: tuple[str, int] | None = None) -> CgroupRun:
    """Run `python -c code *args` in a new memory cgroup limited to `limit` bytes (None: no limit,
    only measured); swap is excluded from the limit's escape (memsw set too where it exists).
    `read_bps`: (device 'MAJOR:MINOR', bytes/s) to throttle the child's reads from that disk.
    Raises RuntimeError when cgroups are not available."""
    if not available():
        raise RuntimeError(f"memory cgroups are not available here ({CGROUP_MEMORY} missing or not writable; run as root)")
    if read_bps is not None and not os.access(CGROUP_BLKIO, os.W_OK):
        raise RuntimeError(f"blkio cgroups are not available here ({CGROUP_BLKIO} missing or not writable)")
    name = f"pipeload-bench-{uuid.uuid4().hex[:10]}"
    group = CGROUP_MEMORY / name
    group.mkdir()
    blkio = CGROUP_BLKIO / name if read_bps is not None else None
    if blkio is not None:
        blkio.mkdir()
        (blkio / "blkio.throttle.read_bps_device").write_text(f"{read_bps[0]} {int(read_bps[1])}")
    try:
        if limit is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            memsw = group / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limit))
        tasks = [str(g / "tasks") for g in (group, blkio) if g is not None]

        def enter_group():  # runs in the child between fork and exec
            for name in tasks:
                with open(name, "w") as f:
                    f.write(str(os.getpid()))

        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=enter_group,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text() or (
            proc.returncode == -9 and limit is not None and _read_int(group / "memory.failcnt") > 0)
        result = None
        if proc.returncode == 0 and out.strip():
            result = json.loads(out.strip().splitlines()[-1])
        return CgroupRun(result=result, max_usage=_read_int(group / "memory.max_usage_in_bytes"), limit=limit,
                         limit_hits=_read_int(group / "memory.failcnt"), oom_killed=oom,
                         returncode=proc.returncode, stderr=err[-3000:])
    finally:
        for g in (group, blkio):
            for _ in range(50 if g is not None else 0):  # a group can be removed once its last task has exited
                try:
                    g.rmdir()
                    break
                except OSError:
                    import time

                    time.sleep(0.05)
