"""User-facing errors: every bad input becomes one of these, and the CLI prints it as one line, exit code 2."""
from __future__ import annotations


class EmlocError(Exception):
    """Base of every error the CLI reports as a one-line message with exit code 2."""


class BadInputError(EmlocError, ValueError):
    """A demonstration folder, image, JSON line or option value is unusable."""


class MemoryFileError(EmlocError):
    """A task-memory file is missing, truncated, corrupt, of an unknown version, or fails validation."""


class ModelMismatchError(EmlocError):
    """A task memory was built for another model than the one given."""


class ModelLoadError(EmlocError):
    """A model folder or GGUF file cannot be found or is not a supported model."""
