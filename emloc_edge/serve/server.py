"""Run the HTTP API in this machine's processes: uvicorn, one `EdgeModel` per worker process.

With `workers > 1` uvicorn imports the app in each worker (`app_from_env`), so the settings travel in an
environment variable. uvicorn finishes in-flight requests on SIGINT/SIGTERM (graceful shutdown, bounded
by the request timeout)."""
from __future__ import annotations

import logging
import os

from .config import ServeConfig

ENV = "EMLOC_EDGE_SERVE_CONFIG"


def build_app(config: ServeConfig):
    from .app import create_app
    from .local import LocalBackend

    return create_app(LocalBackend(config), config)


def configure_logging(level: str = "info") -> None:
    """Request lines (`<id> <method> <path> <status> <ms>`) on stderr, in every worker process."""
    logger = logging.getLogger("emloc_edge.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def app_from_env():
    """uvicorn factory for worker processes."""
    configure_logging()
    return build_app(ServeConfig.from_json(os.environ[ENV]))


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
               log_level: str = "info") -> None:
    import uvicorn

    configure_logging(log_level)
    grace = int(config.request_timeout_s) + 1
    if workers > 1:
        os.environ[ENV] = config.to_json()
        uvicorn.run("emloc_edge.serve.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=grace)
        return
    uvicorn.run(build_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)
