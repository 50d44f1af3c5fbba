"""The ARM NEON kernels (Raspberry Pi 5: Cortex-A76 with dotprod; Pi 4: Cortex-A72 without),
cross-compiled and run under user-mode emulation against the float64 reference and against the
x86 build's bits (every path follows one order of operations, so they must be equal).

Needs Debian's `gcc-aarch64-linux-gnu` and `qemu-user-static` (the README's test command installs
them); skipped with that reason where they are absent.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel_reference import QTYPES, random_blocks, reference
from pipeload.quant import kernels

CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static")
pytestmark = pytest.mark.skipif(CC is None or QEMU is None,
                                reason="needs gcc-aarch64-linux-gnu and qemu-user-static (apt-get install)")

DRIVER = Path(__file__).parent / "native" / "kernels_driver.c"
CPUS = {"neon-dotprod": ("armv8.2-a+dotprod", "cortex-a76"), "neon": ("armv8-a", "cortex-a72")}
M, N, K = 5, 37, 768


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The input file and what each case is: (qtype, blocks, x)."""
    folder = tmp_path_factory.mktemp("aarch64")
    items, data = [], bytearray()
    for qtype in QTYPES:
        blocks = random_blocks(qtype, N, K, seed=int(qtype))
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(int(qtype)))
        x[1, :256] = 0
        items.append((qtype, blocks, x))
        data += struct.pack("<4q", int(qtype), N, K, M) + blocks.numpy().tobytes() + x.numpy().tobytes()
    path = folder / "cases.bin"
    path.write_bytes(bytes(data))
    return folder, path, items


@pytest.mark.parametrize("backend", sorted(CPUS))
def test_neon_kernels_under_emulation(cases, backend):
    folder, path, items = cases
    march, cpu = CPUS[backend]
    exe = folder / f"driver-{backend}"
    sources = [str(p) for p in kernels.sources()] + [str(DRIVER)]
    subprocess.run([CC, "-O3", f"-march={march}", "-ffp-contract=off", "-fno-math-errno", "-static", "-pthread",
                    *sources, "-o", str(exe), "-lm"], check=True, capture_output=True)
    out = folder / f"out-{backend}.bin"
    done = subprocess.run([QEMU, "-cpu", cpu, str(exe), str(path), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == backend
    got = np.fromfile(out, dtype=np.float32).reshape(len(items), 2, M, N)
    x86 = kernels.library("generic")
    for (qtype, blocks, x), (together, alone) in zip(items, got):
        ref, bound = reference(x, blocks, qtype)
        y = torch.from_numpy(together.copy())
        err = (y.double() - ref).abs()
        assert bool((err <= bound).all()), f"{qtype.name}: max error / bound {(err / bound).max().item():.3g}"
        assert np.array_equal(together, alone), f"{qtype.name}: a row alone differs from the batch"
        if x86 is not None:
            from test_gguf_kernels import _product

            assert torch.equal(y, _product(x86, qtype, blocks, x)), f"{qtype.name}: differs from the x86 bits"
        print(f"{backend} ({cpu}) {qtype.name:5}: max error / bound {(err / bound).max().item():.3f}, "
              f"bit-identical to x86 and to rows alone")
