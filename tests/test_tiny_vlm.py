"""The tiny_vlm family (the default model's) on compile side, against plain transformers: the fixture's folder
loads through `load_model`, an unpruned memory + query equals one HF forward of the whole conversation fed
`inputs_embeds` with `ImageTokens` output in the image slots, positions are plain token counts, and image
counts that do not match the slots are refused. One image token (2x2 maps pooled to 1) and four (2x2)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emloc_edge.compile.compressor import CompileOptions, Compressor
from emloc_edge.compile.demos import Demo
from emloc_edge.compile.query import memory_kv, query_logits
from emloc_edge.errors import ModelLoadError
from emloc_edge.models.default_model import IMAGE_TOKEN
from emloc_edge.models.loading import load_model
from emloc_edge.models.tiny_vlm import TinyVLMAdapter
from emloc_edge.runtime.image import preprocess_square

QUESTION = "which bin for this item?"


@pytest.fixture(scope="module", params=[1, 4], ids=["1token", "4tokens"])
def adapter(request, tiny_vlm_dir) -> TinyVLMAdapter:
    return load_model(tiny_vlm_dir(image_tokens=request.param))


def image_demos(folder: Path, n: int, make_images, seed: int = 0) -> list[Demo]:
    """n image demos, one question, one-token answers A-D."""
    images = make_images(folder, n, seed)
    return [Demo(QUESTION, "ABCD"[i % 4], p) for i, p in enumerate(images)]


def hf_inputs(adapter: TinyVLMAdapter, messages: list[dict], images: list[Path], generation_prompt: bool):
    """(ids [1, T], inputs_embeds [1, T, D]) of plain transformers: the template's tokens, each image token
    repeated T times, and the image's ImageTokens output written over those slots."""
    text = adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = adapter.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.count(image_id) == len(images)
    ids = torch.tensor([[t for i in ids for t in [i] * (adapter.image_tokens if i == image_id else 1)]])
    embeds = adapter.model.get_input_embeddings()(ids)  # [1, T, D]
    if images:
        settings = adapter.image_preprocessing()
        pixels = torch.from_numpy(np.stack([preprocess_square(p, settings) for p in images]))  # [n, 3, S, S]
        features = adapter.vision(pixels)  # [n, T_img, D]
        embeds[ids == image_id] = features.reshape(-1, features.shape[-1])
    return ids, embeds


@torch.no_grad()
def hf_next_logits(adapter: TinyVLMAdapter, demos: list[Demo], question: str, image: Path) -> torch.Tensor:
    messages = adapter.chat.messages(demos) + [{"role": "user", "content": adapter.user_content(question, True)}]
    ids, embeds = hf_inputs(adapter, messages, [d.image for d in demos] + [image], generation_prompt=True)
    return adapter.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits[0, -1]


def test_folder_loads_through_load_model(adapter):
    folder = adapter.source
    assert {p.name for p in folder.iterdir()} == {"config.json", "language_model", "vision_encoder.safetensors",
                                                  "projector.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "emloc_tiny_vlm" and config["image_tokens"] == adapter.image_tokens
    assert adapter.family == "tiny_vlm" and adapter.has_vision and adapter.geometry.position_dims == 1
    assert IMAGE_TOKEN in adapter.tokenizer.all_special_tokens
    assert adapter.tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [adapter.image_token_id]
    assert adapter.image_preprocessing()["processor"] == "square"
    with torch.no_grad():
        out = adapter.vision(torch.zeros(2, 3, config["image_size"], config["image_size"]))
    assert out.shape == (2, adapter.image_tokens, adapter.geometry.hidden_size)


def test_builds_are_deterministic(tiny_vlm_dir, tmp_path):
    from tiny_vlm_model import build_tiny_vlm

    again = build_tiny_vlm(tmp_path / "again")
    for name in ("vision_encoder.safetensors", "projector.safetensors", "language_model/model.safetensors"):
        assert (again / name).read_bytes() == (tiny_vlm_dir(image_tokens=1) / name).read_bytes(), name


def test_images_pick_different_codebook_words(adapter, make_images, tmp_path):
    """Precondition of the equivalence tests: images really change the LM input (not one constant word)."""
    settings = adapter.image_preprocessing()
    pixels = torch.from_numpy(np.stack([preprocess_square(p, settings) for p in make_images(tmp_path, 8, 0)]))
    with torch.no_grad():
        words = adapter.vision.projector.scores(adapter.vision.encoder(pixels)).argmax(-1)  # [8, T]
    assert len(set(words.flatten().tolist())) >= 2


def test_no_pruning_equals_transformers_on_the_whole_conversation(adapter, make_images, tmp_path):
    """delta < 0 keeps everything; chunked prefill + query equals one HF forward (fp32, 1e-4)."""
    demos = image_demos(tmp_path / "demos", 7, make_images)  # chunks of 3, 3, 1
    memory = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=3, precision="fp32")).compile(demos)
    assert memory.meta.kept_tokens_per_layer == [memory.meta.context_tokens] * adapter.geometry.num_layers
    image = make_images(tmp_path / "query", 1, 99)[0]
    ours = query_logits(adapter, memory_kv(memory), memory.meta.position_offset, QUESTION, image)
    reference = hf_next_logits(adapter, demos, QUESTION, image)
    assert torch.allclose(ours, reference, atol=1e-4), float((ours - reference).abs().max())


def test_position_offset_is_the_conversation_length(adapter, make_images, tmp_path):
    demos = image_demos(tmp_path / "demos", 5, make_images)
    memory = Compressor(adapter, CompileOptions(delta=-1.0, chunk_size=2, precision="fp32")).compile(demos)
    ids, _ = hf_inputs(adapter, adapter.chat.messages(demos), [d.image for d in demos], generation_prompt=False)
    assert memory.meta.context_tokens == memory.meta.position_offset == ids.shape[1]
    assert memory.meta.position_dims == 1
    assert memory.meta.image_preprocessing["processor"] == "square"


def test_image_count_must_match_the_slots(adapter, make_images, tmp_path):
    image = make_images(tmp_path, 1, 3)[0]
    with_slot = adapter.chat.query_piece(QUESTION, has_image=True)
    without = adapter.chat.query_piece(QUESTION, has_image=False)
    for piece, images, message in ((with_slot, [], "0 images for 1 image slots"),
                                   (without, [image], "1 images for 0 image slots"),
                                   (with_slot, [image, image], "2 images for 1 image slots")):
        with pytest.raises(ModelLoadError) as e:
            adapter.sequence(piece, images)
        assert str(e.value) == message
    seq = adapter.sequence(with_slot, [image])
    assert seq.input_ids.count(adapter.image_token_id) == adapter.image_tokens
