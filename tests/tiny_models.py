"""Tiny random test checkpoints (Qwen2-VL, Qwen2.5-VL, Llama) built locally, no Hub access.

``build_tiny_model(family, out_dir, **overrides)`` writes a folder shaped like a real checkpoint
(``config.json``, fp32 ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` with the ``chat_template`` inline, and for the VL families
``preprocessor_config.json``), which is then loaded back through the ordinary local-directory
``from_pretrained`` path. Builds are deterministic: fixed torch seed, deterministic BPE training.

Reference recipe for an HF forward pass (the compressor's equivalence tests compare against exactly
this; ``build_hf_inputs`` below implements it)::

    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(d)
    ip = Qwen2VLImageProcessorPil.from_pretrained(d)          # no torchvision -> no AutoProcessor
    model = Qwen2VLForConditionalGeneration.from_pretrained(d).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]    # template already has all specials
    img = ip(images=pil_images, return_tensors="pt")          # images in order of appearance
    n_tok = (img["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist()
    expanded, k = [], 0
    for t in ids:                                             # each <|image_pad|> -> n_tok[k] copies
        if t == model.config.image_token_id:
            expanded += [t] * n_tok[k]; k += 1
        else:
            expanded.append(t)
    input_ids = torch.tensor([expanded])
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=img["pixel_values"],                 # (sum patches, 3*2*14*14) fp32
            image_grid_thw=img["image_grid_thw"],             # (n_images, 3) = [1, gh, gw]
            mm_token_type_ids=(input_ids == model.config.image_token_id).long(),
        )
    logits = out.logits[0, -1]                                # next-token logits
    # out.cache: DynamicCache; model.model.rope_deltas: next text position = S + rope_deltas

Llama (text only): ``ids = tok.apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)`` -> ``tok(text, add_special_tokens=False)`` -> ``model(input_ids=...,
attention_mask=ones)``. The tokenizer has no post-processor, so no BOS is ever prepended.
(transformers 5: ``apply_chat_template(..., tokenize=True)`` returns a BatchEncoding, not a list.)

``tiny_vlm_model.build_tiny_vlm(out_dir, image_tokens=1, image_size=64)`` writes the default model's own layout
(``emloc_tiny_vlm``: the tiny llama + ``<empty_output>`` image token under ``language_model/``, a random
EfficientNet-Lite0 and projector as safetensors); its HF reference is the language model fed
``inputs_embeds`` with each image's ``ImageTokens`` output written over its T image-token slots.

Default ids: Qwen families (BPE 0-399, specials appended like real Qwen) ``<|endoftext|>`` 400,
``<|im_start|>`` 401, ``<|im_end|>`` 402, ``<|vision_start|>`` 403, ``<|vision_end|>`` 404,
``<|image_pad|>`` 405, ``<|video_pad|>`` 406, vocab_size 407. Llama (specials first like SmolLM2)
``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, vocab_size 400. A 40-80 px image gives
4, 6 or 9 LLM tokens (min_pixels 56², max_pixels 112² -> at most 16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llama")
VL_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")

QWEN_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
LLAMA_SPECIALS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2-VL-Instruct's template, verbatim (default system turn, string or list content).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolLM2-135M-Instruct's ChatML template, verbatim (no BOS emitted by the template).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small built-in English corpus for the BPE; covers the words tests typically use.
_CORPUS: tuple[str, ...] = (
    "You are a helpful assistant. What is shown in this image? Describe the picture.",
    "The answer is red. The answer is blue. The answer is green. The answer is yellow.",
    "What color is the shape? It is a red circle, a blue square, a green triangle.",
    "Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 yes no true false left right up down.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Question: Is there a dog in the picture? Answer: Yes, there is a dog on the grass.",
    "Label this example. The category of the image is cat, dog, bird, car or tree.",
    "A small model answers questions about images and text with short replies.",
    "Please think step by step and give the final answer in one word.",
    "Hello! How can I help you today? Thank you, that is all for now.",
    "The sky is blue and the grass is green; apples are red and bananas are yellow.",
)

# hidden 64, 4 heads x head_dim 16, 2 KV heads (GQA); mrope [2,3,3] sums to head_dim/2 = 8.
_TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0,
    rms_norm_eps=1e-6, initializer_range=0.15, mrope_section=[2, 3, 3],
)
# min/max pixels: 56x56 .. 112x112 -> every image gives 4..16 merged LLM tokens.
_IMAGE_DEFAULTS: dict[str, Any] = dict(min_pixels=56 * 56, max_pixels=112 * 112)


class TinyModel(NamedTuple):
    """A built tiny checkpoint: its family name and folder."""

    family: str
    path: Path


def make_images(out_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """Write ``n`` distinct random RGB PNGs (40-80 px per side) into ``out_dir``; return their paths.

    Each image is a random base colour, a random rectangle and pixel noise, so images differ
    visibly and in content; a fixed seed gives identical files.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 81, size=2))
        arr = np.empty((h, w, 3), dtype=np.int16)
        arr[:] = rng.integers(0, 256, size=3)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 256, size=3)
        arr += rng.integers(-40, 41, size=arr.shape, dtype=np.int16)
        p = out_dir / f"img_{seed}_{i:03d}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(p)
        paths.append(p)
    return paths


def _train_tokenizer(specials: Sequence[str], specials_first: bool, vocab_size: int):
    """Byte-level BPE trained on ``_CORPUS``; specials first (SmolLM2-like) or appended (Qwen-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(specials) if specials_first else [],
        show_progress=False,
    )
    tk.train_from_iterator(list(_CORPUS), trainer=trainer)
    if not specials_first:
        tk.add_special_tokens(list(specials))
    return tk


def _build_tokenizer(family: str, bpe_vocab: int, model_max_length: int, image_token: str | None = None):
    """image_token (llama only): one more special token, and the tiny VLM's chat template with image parts."""
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        extra = (image_token,) if image_token else ()
        tk = _train_tokenizer(LLAMA_SPECIALS + extra, specials_first=True, vocab_size=bpe_vocab)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
            pad_token="<|endoftext|>", unk_token="<|endoftext|>",
            extra_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
            model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        )
        tok.chat_template = _tiny_vlm_template(image_token) if image_token else SMOLLM2_CHAT_TEMPLATE
    else:
        tk = _train_tokenizer(QWEN_SPECIALS, specials_first=False, vocab_size=bpe_vocab)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens=list(QWEN_SPECIALS[1:]),
            model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        )
        tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def _text_kwargs(t: dict[str, Any], vocab_size: int, ids: dict[str, int], family: str) -> dict[str, Any]:
    rope: dict[str, Any] = dict(rope_type="default", rope_theta=t["rope_theta"])
    if family in VL_FAMILIES:
        rope["mrope_section"] = list(t["mrope_section"])
    bos = ids["<|endoftext|>"]
    return dict(
        vocab_size=vocab_size, hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
        max_position_embeddings=t["max_position_embeddings"], rms_norm_eps=t["rms_norm_eps"],
        initializer_range=t["initializer_range"], rope_parameters=rope,
        bos_token_id=bos, eos_token_id=ids["<|im_end|>"], pad_token_id=bos,
    )


def _build_config(family: str, t: dict[str, Any], vocab_size: int, ids: dict[str, int]):
    text = _text_kwargs(t, vocab_size, ids, family)
    init = t["initializer_range"]
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**text, head_dim=t["head_dim"], tie_word_embeddings=False,
                           attention_bias=False, mlp_bias=False)
    tokens = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    h = t["hidden_size"]
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=32, hidden_size=h, mlp_ratio=2, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      initializer_range=init)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # window 56 px = 2x2 merged units, so the tiny images exercise window attention;
        # block 1 is full attention (like fullatt_block_indexes in the real model).
        vision = dict(depth=2, hidden_size=32, out_hidden_size=h, intermediate_size=64,
                      num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=[1], tokens_per_second=2,
                      initializer_range=init)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "llama": transformers.LlamaForCausalLM,
    }[family]


def model_class(family: str):
    """The concrete HF model class a family folder loads with."""
    return _model_class(family)


def build_tiny_model(family: str, out_dir: Path, **overrides: Any) -> Path:
    """Build a tiny random checkpoint of ``family`` into ``out_dir`` and return ``out_dir``.

    Overrides: any key of ``_TEXT_DEFAULTS`` (e.g. ``num_hidden_layers``,
    ``max_position_embeddings``, ``initializer_range``), ``min_pixels``/``max_pixels``,
    ``bpe_vocab`` (BPE size incl. bytes, default 400), ``seed`` (default 0).
    """
    return _build_checkpoint(family, Path(out_dir), overrides)


def _build_checkpoint(family: str, out_dir: Path, overrides: dict[str, Any], image_token: str | None = None) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    overrides = dict(overrides)
    t = dict(_TEXT_DEFAULTS)
    img = dict(_IMAGE_DEFAULTS)
    seed = int(overrides.pop("seed", 0))
    bpe_vocab = int(overrides.pop("bpe_vocab", 400))
    for k, v in overrides.items():
        if k in t:
            t[k] = v
        elif k in img:
            img[k] = v
        else:
            raise TypeError(f"unknown override {k!r}")
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer(family, bpe_vocab, int(t["max_position_embeddings"]), image_token)
    specials = LLAMA_SPECIALS if family == "llama" else QWEN_SPECIALS
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    vocab_size = len(tok)  # exact fit: every id the model can emit decodes to a real token
    assert max(ids.values()) < vocab_size

    config = _build_config(family, t, vocab_size, ids)
    # fork_rng: deterministic weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(family)(config).eval()
    model.to(torch.float32)
    if model.generation_config is not None:
        model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    # save_jinja_files=False keeps chat_template inside tokenizer_config.json (classic layout).
    tok.save_pretrained(out_dir, save_jinja_files=False)

    if family in VL_FAMILIES:
        _write_preprocessor_config(out_dir, img)
    return out_dir


# ------------------------------------------------------------------------------------- tiny VLM
def _tiny_vlm_template(image_token: str) -> str:
    """The default model's ChatML template (an image part renders as `image_token` then a newline)."""
    from emloc_edge.models.default_model import CHAT_TEMPLATE, IMAGE_TOKEN

    return CHAT_TEMPLATE.replace(IMAGE_TOKEN, image_token)


def _write_preprocessor_config(out_dir: Path, img: dict[str, Any]) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil(
        min_pixels=img["min_pixels"], max_pixels=img["max_pixels"],
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    ip.save_pretrained(out_dir)
    # Real Qwen2-VL checkpoints name the class Qwen2VLImageProcessor and also carry
    # min_pixels/max_pixels at top level; mirror that so either loader path works.
    p = out_dir / "preprocessor_config.json"
    cfg = json.loads(p.read_text())
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    cfg["min_pixels"] = img["min_pixels"]
    cfg["max_pixels"] = img["max_pixels"]
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_image_processor(model_dir: Path):
    """The torchvision-free image processor for a VL folder."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))


def build_hf_inputs(
    tokenizer: Any,
    image_processor: Any,
    messages: list[dict[str, Any]],
    images: Sequence[Any] = (),
    add_generation_prompt: bool = True,
    image_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Model kwargs for an HF forward over ``messages`` (the recipe in the module docstring)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_slots = sum(1 for i in ids if i == image_token_id)
    if n_slots != len(images):
        raise ValueError(f"{n_slots} <|image_pad|> slots but {len(images)} images")
    out: dict[str, torch.Tensor] = {}
    if images:
        px = image_processor(images=list(images), return_tensors="pt")
        n_tok = (px["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
        expanded: list[int] = []
        k = 0
        for i in ids:
            if i == image_token_id:
                expanded += [i] * int(n_tok[k])
                k += 1
            else:
                expanded.append(i)
        ids = expanded
        out["pixel_values"] = px["pixel_values"]
        out["image_grid_thw"] = px["image_grid_thw"]
    input_ids = torch.tensor([ids], dtype=torch.long)
    out["input_ids"] = input_ids
    out["attention_mask"] = torch.ones_like(input_ids)
    if images:
        out["mm_token_type_ids"] = (input_ids == image_token_id).long()
    return out
