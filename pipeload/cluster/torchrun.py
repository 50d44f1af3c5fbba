"""Launching a cluster with torchrun: every process runs this module; rank 0 becomes the
coordinator (`pipeload run`), the others workers (`pipeload worker`).

    torchrun --nproc-per-node 3 -m pipeload.cluster.torchrun MODEL -p "prompt" -n 64 [--parallel tensor]
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 1 -m pipeload.cluster.torchrun MODEL ...

torchrun's own store listens on MASTER_PORT; pipeload's coordinator listens on MASTER_PORT + 1.
Extra arguments go to `pipeload run` on rank 0; `--threads` also sets the workers' threads.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Run this process's part; returns its exit status. Raises KeyError without torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    from ..cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: torchrun ... -m pipeload.cluster.torchrun MODEL [pipeload run options]", file=sys.stderr)
        return 2
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        address = f"{os.environ['MASTER_ADDR']}:{int(os.environ['MASTER_PORT']) + 1}"
    except KeyError as e:
        print(f"pipeload.cluster.torchrun: {e.args[0]} is not set: start this module with torchrun", file=sys.stderr)
        return 2
    if world < 2:
        print("pipeload.cluster.torchrun needs at least 2 processes (a coordinator and a worker)", file=sys.stderr)
        return 2
    model, rest = argv[0], argv[1:]
    if rank == 0:
        return cli_main(["run", model, *rest, "--cluster", address, "--workers", str(world - 1)])
    threads = rest[rest.index("--threads") + 1] if "--threads" in rest else "1"
    return cli_main(["worker", "--join", address, "--model", model, "--threads", threads, "--name", f"rank{rank}"])


if __name__ == "__main__":
    sys.exit(main())
