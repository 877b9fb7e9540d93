"""The server's settings: where the model and memories are, and the limits every request is held to."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    model_dir: str
    memories_dir: str
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer <key>`
    max_body_bytes: int = 16 * 1024**2  # request body (base64 images included)
    max_image_pixels: int = 16 * 1024**2  # width * height of one image
    max_tokens: int = 256  # the largest max_tokens a request may ask for
    default_max_tokens: int = 32  # when the request gives none
    request_timeout_s: float = 120.0  # wall time of one request (generation stops there)
    provider: str = "auto"
    threads: int = 0
    memory_inputs: str = "auto"
    cache_bytes: int = 2 * 1024**3  # bound memories kept per model (LRU)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")

    @property
    def memories(self) -> Path:
        return Path(self.memories_dir)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        return cls(**json.loads(text))
