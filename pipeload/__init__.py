"""pipeload: run transformer models larger than memory on small CPU machines and clusters."""

__version__ = "0.1.0"

from .api import PipelineModel  # noqa: E402
from .errors import PipeloadError  # noqa: E402

__all__ = ["PipelineModel", "PipeloadError", "__version__"]
