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
SUPPORTED_VERSIONS = (1, 2)  # 1: its q8 graph takes one K scale per layer; int8 memories then run dequantized
_REQUIRED = ("format", "format_version", "model_name", "model_family", "model_fingerprint", "geometry",
             "weights", "template", "graphs", "embed_tokens", "tokenizer")

_TYPES = {"geometry": dict, "template": dict, "graphs": dict, "embed_tokens": str, "tokenizer": str,
          "model_fingerprint": str, "model_family": str, "model_name": str}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelFolder":
        path = Path(path)
        try:
            is_dir = path.is_dir()
        except (OSError, ValueError) as e:  # a name too long, a NUL byte
            raise ModelLoadError(f"{str(path)[:300]}: unusable model folder path ({getattr(e, 'strerror', None) or e})") from None
        if not is_dir:
            raise ModelLoadError(f"{path}: no such exported model folder (run `emloc-edge export` first)")
        file = path / MANIFEST
        try:
            manifest = json.loads(file.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{file}: missing; {path} is not an exported model folder") from None
        except (OSError, ValueError, RecursionError) as e:
            raise ModelLoadError(f"{file}: unreadable manifest ({str(e)[:120] or type(e).__name__})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ModelLoadError(f"{file}: not an emloc-edge model manifest")
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise ModelLoadError(f"{file}: missing field {missing[0]!r}")
        wrong = next((k for k, t in _TYPES.items() if not isinstance(manifest[k], t)), None)
        if wrong or not all(isinstance(g, dict) and isinstance(g.get("file"), str) for g in manifest["graphs"].values()):
            raise ModelLoadError(f"{file}: field {wrong or 'graphs'!r} is malformed; re-export the model")
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
        """Refuse a task memory compiled with other weights than this folder was exported from, or one whose
        geometry, positions, template or image settings this folder's graphs cannot run with."""
        mine = self.manifest["model_fingerprint"]
        if memory.meta.model_fingerprint != mine:
            raise ModelMismatchError(
                f"{memory_path}: compiled for model {memory.meta.model_name} "
                f"({memory.meta.model_fingerprint[:12]}), but {self.path} holds {self.manifest['model_name']} "
                f"({mine[:12]}); compile the memory with this model or export the memory's model"
            )
        problem = memory_problem(memory.meta, self.manifest)
        if problem:
            raise ModelMismatchError(f"{memory_path}: {problem}, so {self.path} cannot run it; the memory "
                                     "was not written by emloc-edge compile for this model")


def memory_problem(meta, manifest: dict) -> str | None:
    """What makes a memory (its MemoryMeta) unusable with this manifest's graphs, or None."""
    return _geometry_problem(meta, manifest) or _template_problem(meta, manifest)


def _geometry_problem(meta, manifest: dict) -> str | None:
    g = manifest["geometry"]
    for name in ("num_layers", "num_kv_heads", "head_dim", "position_dims"):
        if getattr(meta, name) != g.get(name):
            return f"meta.{name} is {getattr(meta, name)}, the model's is {g.get(name)}"
    if meta.model_family != manifest["model_family"]:
        return f"meta.model_family is {meta.model_family!r:.40}, the model's is {manifest['model_family']!r}"
    if not isinstance(g.get("max_positions"), int) or meta.position_offset >= g["max_positions"]:
        return f"meta.position_offset {meta.position_offset} leaves no room in the model's {g.get('max_positions')} positions"
    return None


def _template_problem(meta, manifest: dict) -> str | None:
    """The pieces render_query and the decode loop read. Stop tokens and the end of turn must be the
    model's own; the query pieces are the memory's (a compiled memory continues its conversation, a
    zero-shot one opens it) and need only be a [prefix, suffix] pair of valid strings."""
    for key, value in manifest["template"].items():
        if key in _QUERY_PIECES:
            if not _is_piece_pair(meta.template.get(key, None), allow_none=value is None):
                return f"meta.template.{key} is missing or not a [prefix, suffix] pair of strings"
        elif meta.template.get(key, None) != value:
            return f"meta.template.{key} is missing or differs from the model's"
    question = meta.template.get("default_question")
    if question is not None and (not isinstance(question, str) or not is_unicode(question)):
        return "meta.template.default_question is not a valid Unicode string"
    if manifest.get("image_preprocessing") is not None and meta.image_preprocessing != manifest["image_preprocessing"]:
        return "meta.image_preprocessing differs from the model's"
    return None


_QUERY_PIECES = ("query_text", "query_image")


def _is_piece_pair(value, allow_none: bool) -> bool:
    if value is None:
        return allow_none
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(piece, str) and is_unicode(piece) for piece in value))


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate cannot be encoded, nor tokenized
        return True
    except UnicodeEncodeError:
        return False
