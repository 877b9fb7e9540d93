"""What `emloc-edge serve` does: settings from the options, checks before anything starts, then the
single-machine server (server.py) or the Ray Serve application (ray_app.py)."""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, EmlocError
from ..runtime.model_folder import ModelFolder
from .config import ServeConfig


class MissingExtraError(EmlocError):
    """The [serve] extra is not installed."""


def serve_command(model_dir: Path, memories_dir: Path, *, host: str, port: int, api_key: str | None, workers: int,
                  max_body_bytes: int, max_image_pixels: int, max_tokens: int, request_timeout: float,
                  memory_cache_mb: int, provider: str, threads: int, use_ray: bool, address: str | None,
                  replicas: int) -> None:
    ModelFolder.open(model_dir)  # a bad folder fails here, in one line, before any server starts
    if not Path(memories_dir).is_dir():
        raise BadInputError(f"{memories_dir}: no such memories folder")
    config = ServeConfig(str(Path(model_dir).resolve()), str(Path(memories_dir).resolve()), api_key=api_key,
                         max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels, max_tokens=max_tokens,
                         default_max_tokens=min(32, max_tokens), request_timeout_s=request_timeout,
                         provider=provider, threads=threads, cache_bytes=memory_cache_mb * 1024**2)
    try:
        if use_ray:
            from .ray_app import run_on_ray

            run_on_ray(config, host=host, port=port, address=address, replicas=replicas)
        else:
            from .server import run_server

            run_server(config, host=host, port=port, workers=workers)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "ray", "pydantic"):
            raise MissingExtraError(f"serve needs the [serve] extra ({e.name} is missing): "
                                    "pip install 'emloc-edge[serve]'") from None
        raise
