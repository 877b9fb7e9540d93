"""Load a model from a local HF folder or a GGUF file, never from the network, and wrap it in its adapter."""
from __future__ import annotations

import os
from pathlib import Path

# Models come only from local paths; make any accidental Hub lookup fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from ..errors import ModelLoadError  # noqa: E402
from .base import ModelAdapter  # noqa: E402
from .registry import adapter_for  # noqa: E402

# Importing the family modules registers their adapters.
from . import qwen2_vl, text_lm, tiny_vlm  # noqa: E402,F401


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> ModelAdapter:
    """The adapter for the model at `path`: an HF-layout folder (config.json + weights) or a .gguf file."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our own progress output stays readable
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model folder or GGUF file")
    gguf = path.suffix == ".gguf"
    if not gguf and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json) and not a .gguf file")
    folder, kwargs = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    try:
        own = None if gguf else _own_loader(path)
        if own is not None:  # a composed model that is not one HF class loads its own parts
            return own.from_folder(path, dtype)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
        cls = adapter_for(config.model_type)
        auto = transformers.AutoModelForImageTextToText if cls.has_vision else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load the model ({reason})") from None
    return cls(model, tokenizer, path, name=path.stem if gguf else path.name)


def _own_loader(folder: Path) -> type[ModelAdapter] | None:
    """The adapter class when `config.json` names a family that loads its own folder layout."""
    import json

    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: unreadable ({e})") from None
    if not isinstance(model_type, str):
        return None
    try:
        cls = adapter_for(model_type)
    except ModelLoadError:
        return None  # let transformers name what it does not know
    return cls if hasattr(cls, "from_folder") else None
