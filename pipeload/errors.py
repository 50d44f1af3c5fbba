"""Exceptions pipeload raises on bad input. Each names the problem and what to do about it."""


class PipeloadError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ModelFileError(PipeloadError, ValueError):
    """A model file or folder is missing, not a model, truncated or corrupt."""


class UnsupportedModelError(PipeloadError, ValueError):
    """The file is valid but uses an architecture or quant type pipeload does not run."""


class NoTokenizerError(PipeloadError):
    """Text was asked of a model that ships no tokenizer."""


class ContextLengthError(PipeloadError, ValueError):
    """A prompt (plus the tokens to generate) does not fit in the model's context."""


class MemoryBudgetError(PipeloadError, ValueError):
    """The memory budget cannot hold even the smallest runnable plan."""
