"""`export_model`: write a self-contained folder the torch-free runtime answers queries from."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..errors import BadInputError
from ..models.base import ModelAdapter
from ..runtime.model_folder import FORMAT_NAME, MANIFEST

if TYPE_CHECKING:
    from .decoder_step import StepProgress

WEIGHTS = ("fp32", "int8", "int4")
EMBED_FILE, EMBED_SCALE_FILE, EMBED_BLOCK = "embed_tokens.npy", "embed_tokens_scale.npy", 32


def export_model(
    model: str | Path | ModelAdapter,
    out_dir: str | Path,
    weights: str = "int8",
    opset: int = 18,
    validate: bool = True,
    progress: StepProgress | None = None,
) -> dict:
    """Export `model` (a local folder, a .gguf file or an adapter) to `out_dir`; returns the manifest.

    The folder is built in a temporary sibling and renamed into place, so an interrupted export never
    leaves a half-written model. Unless `validate=False`, every output of the fp32 decoder traces is
    checked against PyTorch before the weights are quantized, and a breach of 1e-3 (relative to the
    output's scale) fails the export with an EmlocError. `progress(step)` is
    called with each step's name as it starts (tracing, validating, quantizing, vision, embeddings).
    """
    from ..models.loading import load_model
    from .decoder_step import export_decoder_step

    if weights not in WEIGHTS:
        raise BadInputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}", parameters="weights")
    step = progress or (lambda name: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise BadInputError(f"{out_dir}: exists and is not an exported model folder; refusing to replace it")
    if not out_dir.parent.is_dir():
        raise BadInputError(f"{out_dir}: parent folder {out_dir.parent} does not exist")
    if not isinstance(model, ModelAdapter):
        step("loading the model")
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        build = Path(tmp)
        manifest = _manifest(adapter, weights, opset)
        decoder = export_decoder_step(adapter, build, weights=weights, opset=opset, validate=validate, progress=step)
        manifest["graphs"].update(decoder["graphs"])
        if "validation_max_scaled_diff" in decoder:
            manifest["validation_max_scaled_diff"] = decoder["validation_max_scaled_diff"]
            manifest["validated"] = "fp32 decoder traces against PyTorch, before weight quantization"
        if adapter.has_vision:
            from .vision import export_vision

            step("tracing vision")
            manifest["graphs"]["vision"] = export_vision(adapter, build, opset=opset)
        step("writing embeddings and tokenizer")
        manifest.update(save_embeddings(adapter.text_stack().embed_tokens.weight.detach().float().numpy(), build, weights))
        adapter.tokenizer.backend_tokenizer.save(str(build / manifest["tokenizer"]), pretty=False)  # 3.5 -> 1.6 MB
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(build, out_dir)
    return manifest


def quantize_export(source: str | Path, out_dir: str | Path, weights: str) -> dict:
    """A copy of an fp32 export with int8/int4 (MatMulNBits) decoder weights, without tracing again."""
    from ..runtime.embeddings import load_embeddings
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
        rewritten = {f"{name}.onnx" for name in GRAPHS} | {DATA_FILE, MANIFEST, folder.manifest["embed_tokens"]}
        for f in folder.path.iterdir():
            if f.is_file() and f.name not in rewritten:
                shutil.copy2(f, build / f.name)
        save_shared({name: folder.path / f"{name}.onnx" for name in GRAPHS}, build, DATA_FILE, weights)
        embed = load_embeddings(folder.path, folder.manifest)
        manifest = {**folder.manifest, "weights": weights, **save_embeddings(embed[np.arange(len(embed))], build, weights)}
        manifest.pop("validation_max_scaled_diff", None)
        manifest.pop("validated", None)
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(build, out_dir)
    return manifest


def save_embeddings(embed: np.ndarray, out_dir: Path, weights: str) -> dict[str, str]:
    """Write the token embedding table `embed` [V, D]; returns its manifest fields. fp32 weights: the fp32
    table; int8/int4: int8 rows in blocks of 32 with one float16 scale each (`runtime/embeddings.py`),
    a quarter of the size: the runtime reads only the rows of the tokens it feeds."""
    if weights == "fp32":
        np.save(out_dir / EMBED_FILE, np.ascontiguousarray(embed, dtype=np.float32), allow_pickle=False)
        return {"embed_tokens": EMBED_FILE}
    V, D = embed.shape
    block = EMBED_BLOCK if D % EMBED_BLOCK == 0 else D
    blocks = np.asarray(embed, dtype=np.float32).reshape(V, D // block, block)  # [V, D / block, block]
    scales = np.abs(blocks).max(axis=-1) / 127.0  # [V, D / block]
    half = scales.astype(np.float16)  # GGUF Q8_0 keeps fp16 scales too; fp32 where fp16 cannot hold them
    if np.all(np.isfinite(half)) and not np.any((half == 0) & (scales > 0)):
        scales = half
    step = scales.astype(np.float32)[..., None]  # [V, D / block, 1]: the scale as the runtime reads it
    q = np.round(blocks / np.where(step > 0, step, 1.0)).clip(-127, 127).astype(np.int8)
    np.save(out_dir / EMBED_FILE, q.reshape(V, D), allow_pickle=False)
    np.save(out_dir / EMBED_SCALE_FILE, scales, allow_pickle=False)
    return {"embed_tokens": EMBED_FILE, "embed_tokens_scale": EMBED_SCALE_FILE}


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
