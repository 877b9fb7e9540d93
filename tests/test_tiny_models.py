"""Sanity tests for the tiny random checkpoints (tests/tiny_models.py, tests/conftest.py)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tiny_models import (
    LLAMA_SPECIALS,
    QWEN_SPECIALS,
    VL_FAMILIES,
    TinyModel,
    build_hf_inputs,
    build_tiny_model,
    load_image_processor,
    model_class,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoTokenizer  # noqa: E402


@functools.lru_cache(maxsize=None)
def _model(family: str, path: Path, attn: str = "sdpa") -> Any:
    # Cached: loading is cheap but repeated in many tests.
    return model_class(family).from_pretrained(path, attn_implementation=attn).eval()


@functools.lru_cache(maxsize=None)
def _tok(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, make_images: Callable) -> list[Image.Image]:
    paths = make_images(tmp_path_factory.mktemp("imgs"), 6, 123)
    return [Image.open(p).convert("RGB") for p in paths]


def _conversation(family: str, answer: str, n_demos: int = 1) -> list[dict[str, Any]]:
    """n_demos (question, answer) demonstrations, then a query; one image per user turn (VL)."""
    def user(q: str) -> Any:
        if family in VL_FAMILIES:
            return [{"type": "image"}, {"type": "text", "text": q}]
        return q

    msgs: list[dict[str, Any]] = []
    for _ in range(n_demos):
        msgs += [{"role": "user", "content": user("What color is the shape?")},
                 {"role": "assistant", "content": answer}]
    msgs.append({"role": "user", "content": user("What color is the shape?")})
    return msgs


def _next_logits(tm: TinyModel, msgs: list[dict[str, Any]], imgs: list[Image.Image],
                 attn: str = "sdpa") -> torch.Tensor:
    tok = _tok(tm.path)
    ip = load_image_processor(tm.path) if tm.family in VL_FAMILIES else None
    n_img = sum(1 for m in msgs if isinstance(m["content"], list)
                for c in m["content"] if c.get("type") == "image")
    inputs = build_hf_inputs(tok, ip, msgs, imgs[:n_img])
    with torch.no_grad():
        return _model(tm.family, tm.path, attn)(**inputs).logits[0, -1]


def test_folder_has_checkpoint_files(all_family_dir: TinyModel) -> None:
    names = {p.name for p in all_family_dir.path.iterdir()}
    want = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"}
    if all_family_dir.family in VL_FAMILIES:
        want.add("preprocessor_config.json")
    assert want <= names
    tcfg = json.loads((all_family_dir.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]
    with safe_open(str(all_family_dir.path / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}


def test_loads_and_special_ids_fit(all_family_dir: TinyModel) -> None:
    fam, path = all_family_dir
    cfg = AutoConfig.from_pretrained(path)
    tok = _tok(path)
    model = _model(fam, path)
    assert type(model).__name__ == model_class(fam).__name__
    assert model.dtype == torch.float32
    tcfg = cfg.get_text_config()
    assert len(tok) <= tcfg.vocab_size
    assert tcfg.hidden_size == 64 and tcfg.num_attention_heads == 4
    assert tcfg.num_key_value_heads == 2 and tcfg.num_hidden_layers == 4
    assert tcfg.initializer_range == pytest.approx(0.15)
    specials = LLAMA_SPECIALS if fam == "llama" else QWEN_SPECIALS
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    assert len(set(ids.values())) == len(specials)
    assert all(0 <= i < tcfg.vocab_size for i in ids.values())
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tcfg.eos_token_id == ids["<|im_end|>"]
    for s, i in ids.items():  # specials encode atomically
        assert tok(s, add_special_tokens=False)["input_ids"] == [i]
    if fam in VL_FAMILIES:
        assert cfg.image_token_id == ids["<|image_pad|>"]
        assert cfg.video_token_id == ids["<|video_pad|>"]
        assert cfg.vision_start_token_id == ids["<|vision_start|>"]
        assert cfg.vision_end_token_id == ids["<|vision_end|>"]
        assert sum(tcfg.rope_parameters["mrope_section"]) == 16 // 2


def test_chat_template_renders_and_is_prefix_stable(all_family_dir: TinyModel) -> None:
    fam, path = all_family_dir
    tok = _tok(path)
    msgs = _conversation(fam, "red", n_demos=2) + [{"role": "assistant", "content": "blue"}]
    full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert full.startswith("<|im_start|>system\n")  # default system turn, no BOS
    assert full.endswith("<|im_start|>assistant\n")
    if fam in VL_FAMILIES:
        assert full.count("<|vision_start|><|image_pad|><|vision_end|>") == 3
    for n in range(1, len(msgs)):
        a = tok.apply_chat_template(msgs[:n], tokenize=False)
        b = tok.apply_chat_template(msgs[: n + 1], tokenize=False)
        assert b.startswith(a), n
        ia = tok(a, add_special_tokens=False)["input_ids"]
        ib = tok(b, add_special_tokens=False)["input_ids"]
        assert ib[: len(ia)] == ia, n  # also prefix-stable at the token level
    # tokenize=True path adds no BOS either (v5 returns a BatchEncoding by default).
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert enc["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok(full)["input_ids"] == enc["input_ids"]  # no post-processor: never a BOS
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    if fam in VL_FAMILIES:
        sys_msgs[1]["content"] = [{"type": "text", "text": "hi"}]
    text = tok.apply_chat_template(sys_msgs, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_image_processor_gives_few_tokens(family: str, tiny_model_dir: Callable,
                                          images: list[Image.Image]) -> None:
    ip = load_image_processor(tiny_model_dir(family))
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    out = ip(images=images, return_tensors="pt")
    n_tok = (out["image_grid_thw"].prod(-1) // ip.merge_size**2).tolist()
    assert all(4 <= n <= 16 for n in n_tok), n_tok
    assert out["pixel_values"].shape == (int(out["image_grid_thw"].prod(-1).sum()), 3 * 2 * 14 * 14)


def test_vl_forward_two_images(vl_family_dir: TinyModel, images: list[Image.Image]) -> None:
    fam, path = vl_family_dir
    tok, ip, model = _tok(path), load_image_processor(path), _model(fam, path)
    msgs = _conversation(fam, "red", n_demos=1)
    inputs = build_hf_inputs(tok, ip, msgs, images[:2])
    ids = inputs["input_ids"]
    n_tok = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert int((ids == model.config.image_token_id).sum()) == sum(n_tok)
    assert torch.equal(inputs["mm_token_type_ids"], (ids == model.config.image_token_id).long())
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, ids.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(out.logits).all()
    assert out.cache.get_seq_length() == ids.shape[1]
    # M-RoPE: each image compresses its positions to max(gh, gw)/merge, so rope_deltas < 0.
    assert int(model.model.rope_deltas) < 0


def test_outputs_depend_on_context(all_family_dir: TinyModel, images: list[Image.Image]) -> None:
    fam = all_family_dir.family
    answers = ["red", "blue", "green", "yellow", "dog", "cat", "yes", "no",
               "The answer is red.", "seven", "a small bird", "left"]
    logits = {a: _next_logits(all_family_dir, _conversation(fam, a, n_demos=2), images)
              for a in answers}
    assert (logits["red"] - logits["blue"]).abs().max() > 0.1
    # The greedy next token itself changes with the demonstrations' answers (init 0.15,
    # notes section 8; at HF's default 0.02 it would be one token regardless of context).
    assert len({int(v.argmax()) for v in logits.values()}) > 1
    if fam in VL_FAMILIES:
        swapped = _next_logits(all_family_dir, _conversation(fam, "red", n_demos=2),
                               [images[0], images[1], images[3]])
        assert (swapped - logits["red"]).abs().max() > 0.01  # the query image matters too


def test_eager_matches_sdpa(all_family_dir: TinyModel, images: list[Image.Image]) -> None:
    msgs = _conversation(all_family_dir.family, "red", n_demos=2)
    a = _next_logits(all_family_dir, msgs, images, "sdpa")
    b = _next_logits(all_family_dir, msgs, images, "eager")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_overrides_and_small_positions(tiny_model_dir: Callable) -> None:
    path = tiny_model_dir("llama", num_hidden_layers=2, max_position_embeddings=64)
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.max_position_embeddings) == (2, 64)
    vl = tiny_model_dir("qwen2_vl", num_hidden_layers=1)
    assert AutoConfig.from_pretrained(vl).get_text_config().num_hidden_layers == 1
    assert tiny_model_dir("llama", num_hidden_layers=2, max_position_embeddings=64) == path
    with pytest.raises(TypeError):
        build_tiny_model("llama", path.parent / "bad", not_a_key=1)
    with pytest.raises(ValueError):
        build_tiny_model("gpt2", path.parent / "bad")


def test_build_is_deterministic(tmp_path: Path, qwen2_5_vl_dir: Path) -> None:
    again = build_tiny_model("qwen2_5_vl", tmp_path / "again")

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert digest(again / name) == digest(qwen2_5_vl_dir / name), name
