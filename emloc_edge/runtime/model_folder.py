"""The exported model folder: its manifest, graphs and tokenizer, validated before anything runs.

    MODEL_DIR/
      manifest.json            fingerprint, geometry, template pieces, image preprocessing, graph I/O
      decoder_step.onnx        float memory inputs      } share decoder_weights.data
      decoder_step_q8.onnx     int8 memory inputs       }
      embed_tokens.npy         token embedding table (memory-mapped; rows read on demand; runtime/embeddings.py)
      embed_tokens_scale.npy   its block scales when the table is int8 (int8/int4 exports)
      vision.onnx              vision-language families only
      tokenizer.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError, ModelMismatchError

MANIFEST = "manifest.json"
FORMAT_NAME = "emloc-edge-model"
SUPPORTED_VERSIONS = (1,)
_REQUIRED = ("format", "format_version", "model_name", "model_family", "model_fingerprint", "geometry",
             "weights", "template", "graphs", "embed_tokens", "tokenizer")


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: no such exported model folder (run `emloc-edge export` first)")
        file = path / MANIFEST
        try:
            manifest = json.loads(file.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{file}: missing; {path} is not an exported model folder") from None
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{file}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ModelLoadError(f"{file}: not an emloc-edge model manifest")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ModelLoadError(f"{file}: missing field {missing[0]!r}")
        if manifest["format_version"] not in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{file}: format version {manifest['format_version']} is not supported "
                                 f"(this emloc-edge reads {', '.join(map(str, SUPPORTED_VERSIONS))})")
        folder = cls(path, manifest)
        for name in folder.files():
            if not (path / name).is_file():
                raise ModelLoadError(f"{path / name}: missing from the exported model folder")
        return folder

    def files(self) -> list[str]:
        m = self.manifest
        names = [g["file"] for g in m["graphs"].values()] + [m["embed_tokens"], m["tokenizer"]]
        names += [m["embed_tokens_scale"]] if m.get("embed_tokens_scale") else []
        names += [g["external_data"] for g in m["graphs"].values() if g.get("external_data")]
        return sorted(set(names))

    def graph(self, name: str) -> Path:
        if name not in self.manifest["graphs"]:
            raise ModelLoadError(f"{self.path}: the exported model has no {name!r} graph")
        return self.path / self.manifest["graphs"][name]["file"]

    @property
    def geometry(self) -> dict:
        return self.manifest["geometry"]

    @property
    def has_vision(self) -> bool:
        return "vision" in self.manifest["graphs"]

    def check_memory(self, memory, memory_path: Path) -> None:
        """Refuse a task memory compiled with other weights than this folder was exported from."""
        mine = self.manifest["model_fingerprint"]
        if memory.meta.model_fingerprint != mine:
            raise ModelMismatchError(
                f"{memory_path}: compiled for model {memory.meta.model_name} "
                f"({memory.meta.model_fingerprint[:12]}), but {self.path} holds {self.manifest['model_name']} "
                f"({mine[:12]}); compile the memory with this model or export the memory's model"
            )
