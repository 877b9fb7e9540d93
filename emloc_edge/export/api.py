"""`export_model`: write a self-contained folder the torch-free runtime answers queries from."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import BadInputError
from ..models.base import ModelAdapter
from ..runtime.model_folder import FORMAT_NAME, MANIFEST

WEIGHTS = ("fp32", "int8", "int4")


def export_model(
    model: str | Path | ModelAdapter,
    out_dir: str | Path,
    weights: str = "fp32",
    opset: int = 18,
    validate: bool = True,
) -> dict:
    """Export `model` (a local folder, a .gguf file or an adapter) to `out_dir`; returns the manifest.

    The folder is built in a temporary sibling and renamed into place, so an interrupted export never
    leaves a half-written model. With fp32 weights every decoder output is checked against PyTorch
    and a breach of 1e-4 fails the export unless `validate=False`.
    """
    from ..models.loading import load_model
    from .decoder_step import export_decoder_step, validate_decoder_step

    if weights not in WEIGHTS:
        raise BadInputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}", parameters="weights")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise BadInputError(f"{out_dir}: exists and is not an exported model folder; refusing to replace it")
    if not out_dir.parent.is_dir():
        raise BadInputError(f"{out_dir}: parent folder {out_dir.parent} does not exist")
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        build = Path(tmp)
        manifest = _manifest(adapter, weights, opset)
        manifest["graphs"].update(export_decoder_step(adapter, build, weights=weights, opset=opset)["graphs"])
        if adapter.has_vision:
            from .vision import export_vision

            manifest["graphs"]["vision"] = export_vision(adapter, build, opset=opset)
        embed = adapter.text_stack().embed_tokens.weight.detach().float().numpy()  # [vocab, D]
        np.save(build / manifest["embed_tokens"], np.ascontiguousarray(embed), allow_pickle=False)
        adapter.tokenizer.backend_tokenizer.save(str(build / manifest["tokenizer"]))
        if validate and weights == "fp32":
            manifest["validation_max_scaled_diff"] = validate_decoder_step(adapter, build)
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(build, out_dir)
    return manifest


def quantize_export(source: str | Path, out_dir: str | Path, weights: str) -> dict:
    """A copy of an fp32 export with int8/int4 (MatMulNBits) decoder weights, without tracing again."""
    from ..runtime.model_folder import ModelFolder
    from .decoder_step import DATA_FILE, GRAPHS
    from .weights import save_shared

    if weights not in WEIGHTS[1:]:
        raise BadInputError(f"weights must be int8 or int4 to quantize an export, got {weights!r}")
    folder = ModelFolder.open(source)
    if folder.manifest["weights"] != "fp32":
        raise BadInputError(f"{folder.path}: has {folder.manifest['weights']} weights; quantize an fp32 export")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        build = Path(tmp)
        decoder_files = {f"{name}.onnx" for name in GRAPHS} | {DATA_FILE}
        for f in folder.path.iterdir():
            if f.is_file() and f.name not in decoder_files and f.name != MANIFEST:
                shutil.copy2(f, build / f.name)
        save_shared({name: folder.path / f"{name}.onnx" for name in GRAPHS}, build, DATA_FILE, weights)
        manifest = {**folder.manifest, "weights": weights}
        manifest.pop("validation_max_scaled_diff", None)
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(build, out_dir)
    return manifest


def _manifest(adapter: ModelAdapter, weights: str, opset: int) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": 2,  # 2: the q8 graph takes per-segment K scales + mem_key_segment (exact int8 memories)
        "created_by": f"emloc-edge {__version__}",
        "model_name": adapter.name,
        "model_family": adapter.family,
        "model_fingerprint": adapter.fingerprint(),
        "geometry": dict(adapter.geometry.__dict__),
        "weights": weights,
        "opset": opset,
        "template": adapter.template_pieces(),
        "image_preprocessing": adapter.image_preprocessing(),
        "graphs": {},
        "embed_tokens": "embed_tokens.npy",
        "tokenizer": "tokenizer.json",
    }


def _replace_dir(build: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an existing export is swapped out, then removed."""
    final = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new.", dir=out_dir.parent))
    final.rmdir()
    build.rename(final)
    build.mkdir()  # TemporaryDirectory cleans up this empty stand-in
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    final.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
