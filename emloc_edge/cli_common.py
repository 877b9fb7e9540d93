"""What every `emloc-edge` command shares: the error handler (one line, exit code), the parameter -> flag
table, output and option helpers."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import click

from .errors import EmlocError
from .textout import finite as _finite

T = TypeVar("T")

EXIT_BAD_INPUT = 2
EXIT_EXPORT_BUG = 3  # ExportValidationError: the ONNX graph disagrees with PyTorch (a bug, not bad input)

#: Library parameter -> the CLI's flag for it; library errors name the parameter, the CLI adds the flag.
FLAGS = {
    "provider": "--provider", "max_new_tokens": "--max-new-tokens", "memory_inputs": "--memory-inputs",
    "threads": "--threads", "question": "--question", "delta": "--delta", "ratios": "--ratios",
    "chunk_size": "--chunk-size", "precision": "--precision", "output": "-o/--output", "append": "--append",
    "weights": "--weights", "validate": "--no-validate", "conditions": "--conditions", "limit": "--limit",
    "sweep": "--sweep", "policy": "--policy", "backend": "--backend", "device": "--device",
}


def _one_line(e: BaseException) -> str:
    """The message the user sees for an exception that reached the top."""
    if isinstance(e, EmlocError):
        flags = [FLAGS.get(p, "--" + p.replace("_", "-")) for p in e.parameters]
        return f"{e} ({', '.join(flags)})" if flags else str(e)
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """One top-level handler: user errors -> one line, exit 2; no traceback unless EMLOC_EDGE_DEBUG is set."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return fn(*args, **kwargs)
        except (EmlocError, OSError) as e:
            if os.environ.get("EMLOC_EDGE_DEBUG"):
                raise
            line = f"error: {_one_line(e)}".splitlines()[0]
            # a path from the file system may hold lone surrogates (non-UTF-8 names): show them escaped
            click.echo(line.encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
            sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))

    return wrapper


def _ratios(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(r) for r in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.1,0.2,0.5, got {value!r}") from None


def _emit(as_json: bool, data: dict, text: str) -> None:
    click.echo(json.dumps(_finite(data), allow_nan=False, default=str) if as_json else text)


model_option = click.option(
    "--model", "model", type=click.Path(path_type=Path), envvar="EMLOC_EDGE_MODEL", default=None,
    help="Local HF model folder or .gguf file (env EMLOC_EDGE_MODEL) [default: the embedded emloc-tiny-vlm, "
         "built once from its installed packages].",
)


def _model_or_default(model: Path | None) -> Path:
    """The given model, else the embedded default (assembled on first use, messages on stderr)."""
    if model is not None:
        return model
    from .models.default_model import ensure_default_model

    return ensure_default_model(progress=lambda m: click.echo(m, err=True))
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
