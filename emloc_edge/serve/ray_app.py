"""The same HTTP API on Ray Serve: a gateway deployment (the FastAPI app of app.py) in front of N replicas,
each holding one `EdgeModel`, with memories multiplexed by name so a task's requests go to replicas that
already hold it.

    client ─HTTP─► Ray proxy ─► Gateway (parse, limits, errors; no model) ─handle, multiplexed_model_id=name─►
                   MemoryReplica × N: EdgeModel.open once; @serve.multiplexed loads memory sessions (LRU)

The gateway reads the memories folder for names and summaries; the replicas read the files themselves,
so on a cluster every node sees the folder (shared storage, or the same files copied per node)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from .app import create_app
from .config import ServeConfig
from .errors import APIError, TimeoutError_, api_error
from .local import LocalBackend
from .protocol import Completion, Query
from .registry import MemoryRegistry

APP_NAME = "emloc-edge"
MEMORIES_PER_REPLICA = 16  # memory sessions one replica keeps (multiplex LRU); the EdgeModel cache bounds bytes


def build_application(config: ServeConfig, replicas: int = 2, replica_cpus: float = 1.0,
                      memories_per_replica: int = MEMORIES_PER_REPLICA):
    """The bound Ray Serve application (pass to serve.run)."""

    @serve.deployment(name="MemoryReplica", num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
                      max_ongoing_requests=32, health_check_period_s=2, health_check_timeout_s=30)
    class MemoryReplica:
        def __init__(self, config_json: str) -> None:
            self.backend = LocalBackend(ServeConfig.from_json(config_json))  # one EdgeModel per replica

        @serve.multiplexed(max_num_models_per_replica=memories_per_replica)
        async def session(self, name: str):
            return await run_in_threadpool(self.backend.session, name)

        async def complete(self, query: Query) -> Completion:
            try:
                return await self.backend.complete(query, await self.session(serve.get_multiplexed_model_id()))
            except Exception as e:  # noqa: BLE001 - crosses the process boundary as a plain APIError
                raise api_error(e) from None

        async def stream(self, query: Query) -> AsyncIterator[str]:
            try:
                pieces = await self.backend.stream(query, await self.session(serve.get_multiplexed_model_id()))
            except Exception as e:  # noqa: BLE001
                raise api_error(e) from None
            async for piece in pieces:
                yield piece

        def health(self) -> dict:
            return self.backend.health()

    @serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress()
    class Gateway:
        def __init__(self, replica: DeploymentHandle, config_json: str) -> None:
            self.config = ServeConfig.from_json(config_json)
            self.backend = RayBackend(replica, self.config)

        def __serve_build_asgi_app__(self):
            return create_app(self.backend, self.config)

    return Gateway.bind(MemoryReplica.bind(config.to_json()), config.to_json())


class RayBackend:
    """app.py's Backend over the replicas' handle."""

    kind = "ray"

    def __init__(self, handle: DeploymentHandle, config: ServeConfig) -> None:
        self.handle, self.config = handle, config
        self.registry = MemoryRegistry(config.memories)

    async def complete(self, query: Query) -> Completion:
        call = self.handle.options(multiplexed_model_id=query.name, method_name="complete")
        try:
            return await asyncio.wait_for(call.remote(query), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError_(f"request took over {self.config.request_timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 - the replica's APIError, wrapped by Ray
            raise _wire(e) from None

    async def stream(self, query: Query) -> AsyncIterator[str]:
        pieces = self.handle.options(multiplexed_model_id=query.name, method_name="stream", stream=True).remote(query)
        try:  # the first piece carries the request's errors, before any byte of the stream is sent
            first = await asyncio.wait_for(pieces.__anext__(), self.config.request_timeout_s)
        except StopAsyncIteration:
            first = None
        except Exception as e:  # noqa: BLE001
            pieces.cancel()
            raise _wire(e) from None
        return _rest(first, pieces)

    def health(self) -> dict:
        return {"status": "ok", "backend": self.kind, "replicas": "see `serve status`"}


def _wire(exc: BaseException) -> APIError:
    if isinstance(exc, RayActorError):  # the replica died under this request; Ray is replacing it
        return APIError(503, "the replica serving this request stopped; retry", "server_error", "replica_unavailable")
    return api_error(exc)


async def _rest(first: str | None, pieces) -> AsyncIterator[str]:
    try:
        if first is None:
            return
        yield first
        async for piece in pieces:
            yield piece
    finally:
        pieces.cancel()  # a client that left stops its replica's decoding too


def run_on_ray(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               replicas: int = 2) -> None:
    """Deploy on the cluster at `address` (None: start a local Ray) and serve until interrupted."""
    import time

    import ray

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config, replicas=replicas), name=APP_NAME, route_prefix="/")
    print(f"emloc-edge on Ray Serve: http://{host}:{port} ({replicas} replicas); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)  # drains in-flight requests (graceful_shutdown_timeout_s)
        serve.shutdown()
