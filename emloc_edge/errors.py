"""User-facing errors: every bad input becomes one of these, and the CLI prints it as one line.

Exit codes of the CLI: 2 for bad input (every class here but one), 3 for `ExportValidationError`
(an export whose ONNX graph disagrees with PyTorch: a bug in the exporter, not in the input).
Library messages name Python parameters (`max_new_tokens`); `parameters` lists them so that the CLI
can add its own flag wording (`--max-new-tokens`).
"""
from __future__ import annotations


#: Every character str.splitlines() breaks at, shown escaped, so that a message is always one line.
_ONE_LINE = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class EmlocError(Exception):
    """Base of every error the CLI reports as a one-line message (exit code 2 unless a subclass says otherwise)."""

    exit_code = 2

    def __init__(self, message: str = "", *, parameters: tuple[str, ...] | str = ()) -> None:
        super().__init__(str(message).translate(_ONE_LINE))  # a path or value may hold line breaks
        self.parameters = (parameters,) if isinstance(parameters, str) else tuple(parameters)


class BadInputError(EmlocError, ValueError):
    """A demonstration folder, image, JSON line or option value is unusable."""


class MemoryFileError(EmlocError):
    """A task-memory file is missing, truncated, corrupt, of an unknown version, or fails validation."""


class ModelMismatchError(EmlocError):
    """A task memory was built for another model than the one given, or does not fit its geometry."""


class ModelLoadError(EmlocError):
    """A model folder or GGUF file cannot be found or is not a supported model."""


class ExportValidationError(EmlocError):
    """The exported ONNX graph disagrees with PyTorch beyond the tolerance: an exporter bug, not bad input."""

    exit_code = 3
