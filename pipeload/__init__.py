"""pipeload: run transformer models larger than memory on small CPU machines and clusters."""

import os as _os

# OpenMP threads that spin while waiting collapse (50x measured) as soon as anything else wants
# the cores: our own prefetch threads, other worker processes, other programs. Passive waiting
# costs little when the machine is idle. Takes effect only if torch is not imported yet.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import sys as _sys

    if "torch" in _sys.modules:
        import warnings as _warnings

        _warnings.warn("torch was imported before pipeload, so OpenMP keeps spin-waiting, which is many times "
                       "slower when other threads or processes share the cores; import pipeload first or set "
                       "OMP_WAIT_POLICY=PASSIVE", stacklevel=2)

# MKL (PyTorch's float32 matrix products on x86) picks its code path per call from run-time
# state, so the same product can differ in the last bit between two processes with different
# histories (seen: a cluster stage that had timed a few decode steps before the first prompt gave
# logits 1e-6 away from one process). Conditional bitwise reproducibility pins the path; AVX2
# keeps it vectorised. Read when MKL first runs, so it works even after `import torch`.
_os.environ.setdefault("MKL_CBWR", "AVX2")

__version__ = "0.1.0"

from .api import PipelineModel  # noqa: E402
from .errors import PipeloadError  # noqa: E402

__all__ = ["PipelineModel", "PipeloadError", "__version__"]
