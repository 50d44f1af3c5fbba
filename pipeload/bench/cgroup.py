"""Running a benchmark child inside a memory cgroup (cgroup v1), the way a small machine feels it.

The memory controller charges the child's anonymous memory and the page cache of every file it
reads or maps (model files, torch's shared libraries), so a run that fits its budget here fits on
a machine of that size. `run_in_cgroup` starts the child already inside a fresh group (the pid is
written into `tasks` before exec), waits, and reports the group's peak charge
(`memory.max_usage_in_bytes`), how often the limit was reached (`memory.failcnt`: the kernel then
reclaimed cache to stay under it) and whether the OOM killer fired.
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


def _read_int(path: Path, default: int = 0) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def run_in_cgroup(code: str, args: list, limit: int | None, timeout: float = 3600,
                  env: dict | None = None) -> CgroupRun:
    """Run `python -c code *args` in a new memory cgroup limited to `limit` bytes (None: no limit,
    only measured); swap is excluded from the limit's escape (memsw set too where it exists).
    Raises RuntimeError when cgroups are not available."""
    if not available():
        raise RuntimeError(f"memory cgroups are not available here ({CGROUP_MEMORY} missing or not writable; run as root)")
    group = CGROUP_MEMORY / f"pipeload-bench-{uuid.uuid4().hex[:10]}"
    group.mkdir()
    try:
        if limit is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            memsw = group / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(limit))
        tasks = str(group / "tasks")

        def enter_group():  # runs in the child between fork and exec
            with open(tasks, "w") as f:
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
        for _ in range(50):  # the group can be removed once its last task has exited
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.05)
