"""Answering a query with a task memory in PyTorch: the reference the ONNX runtime is checked against,
and what evaluation and benchmarks use on the compile side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..memory import TaskMemory
from ..models.base import ModelAdapter
from ..models.chat import Piece
from ..models.decoder import LayerKV, RaggedDecoder


def memory_kv(memory: TaskMemory) -> list[LayerKV]:
    """The stored memory as a decoder prefix: per layer [kv, n, hd] float32, as the file holds it."""
    out = []
    for layer in memory.layers:
        key_t, value = layer.dequantized()  # [kv, hd, n], [kv, n, hd]
        key = np.ascontiguousarray(key_t.transpose(0, 2, 1))  # [kv, n, hd]
        out.append(LayerKV(torch.from_numpy(key), torch.from_numpy(np.ascontiguousarray(value))))
    return out


@torch.no_grad()
def query_logits(
    adapter: ModelAdapter, memory: list[LayerKV], position_offset: int, question: str, image: Path | None = None,
    first_turn: bool = False,
) -> torch.Tensor:
    """Next-token logits [vocab] after the query turn (user turn + generation prompt).

    first_turn: render the query as the first turn of a conversation, with the template's system turn
    (for an empty memory: zero-shot); otherwise as a turn following the memory's demonstrations.
    """
    logits, _, _ = _prefill(adapter, RaggedDecoder(adapter), memory, position_offset, question, image, first_turn)
    return logits


@torch.no_grad()
def greedy_answer(
    adapter: ModelAdapter,
    memory: list[LayerKV],
    position_offset: int,
    question: str,
    image: Path | None = None,
    max_new_tokens: int = 16,
    first_turn: bool = False,
) -> list[int]:
    """Greedy token ids of the answer, stopping at the end-of-turn token (first_turn: as in query_logits)."""
    return greedy_answer_and_logits(adapter, memory, position_offset, question, image, max_new_tokens, first_turn)[0]


@torch.no_grad()
def greedy_answer_and_logits(
    adapter: ModelAdapter,
    memory: list[LayerKV],
    position_offset: int,
    question: str,
    image: Path | None = None,
    max_new_tokens: int = 16,
    first_turn: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """`greedy_answer` and the first answer position's logits [vocab] (one prefill for both)."""
    decoder = RaggedDecoder(adapter)
    logits, cache, next_pos = _prefill(adapter, decoder, memory, position_offset, question, image, first_turn)
    first = logits
    stop = {adapter.chat.end_of_turn_id, adapter.tokenizer.eos_token_id}
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        ids = torch.tensor([[token]])
        pos = torch.full((adapter.geometry.position_dims, 1, 1), next_pos)
        step = decoder.forward(decoder.stack.embed_tokens(ids), pos, torch.ones(1, 1, dtype=torch.bool), cache, keep_kv=True)
        cache = [m.extend(k[0], v[0]) for m, (k, v) in zip(cache, step.new_kv)]
        logits, next_pos = decoder.logits(step.hidden[0, -1]), next_pos + 1
    return out, first


def _prefill(adapter, decoder, memory, position_offset, question, image, first_turn=False):
    piece = _first_turn_piece(adapter, question, image) if first_turn else adapter.chat.query_piece(question, image is not None)
    batch = adapter.embed([adapter.sequence(piece, [image] if image is not None else [])])
    out = decoder.forward(batch.inputs_embeds, batch.position_ids + position_offset, batch.attention_mask, memory, keep_kv=True)
    cache = [m.extend(k[0], v[0]) for m, (k, v) in zip(memory, out.new_kv)]
    next_pos = position_offset + int(batch.next_position[0])
    return decoder.logits(out.hidden[0, -1]), cache, next_pos


def _first_turn_piece(adapter: ModelAdapter, question: str, image: Path | None) -> Piece:
    """The query as a whole conversation's only user turn: system turn + user turn + generation prompt."""
    user = {"role": "user", "content": adapter.user_content(question, image is not None)}
    return Piece(adapter.chat.render([user], generation_prompt=True), None)
