"""Zero-shot as a memory file: no tokens, and a template that renders the query as the first turn.

The runtime renders `prefix + question + suffix` from the memory's template; a compiled memory's
pieces continue a conversation, so zero-shot swaps in the pieces of a conversation's only user turn
(system turn + user turn + generation prompt), exactly what the PyTorch path renders with first_turn.
"""
from __future__ import annotations

import copy

from ..errors import ModelLoadError
from ..memory import TaskMemory
from ..models.chat import QUESTION_SLOT


def first_turn_template(adapter, has_image: bool) -> list[str]:
    """[prefix, suffix] around the question when the query is the conversation's first user turn."""
    user = {"role": "user", "content": adapter.user_content(QUESTION_SLOT, has_image)}
    text = adapter.chat.render([user], generation_prompt=True)
    if text.count(QUESTION_SLOT) != 1:
        raise ModelLoadError("chat template alters the question text; cannot derive query pieces")
    return text.split(QUESTION_SLOT)


def empty_first_turn_memory(adapter, like: TaskMemory) -> TaskMemory:
    """A memory of `like`'s model with no chunks, whose queries render as the first user turn."""
    meta = copy.deepcopy(like.meta)
    meta.chunks, meta.position_offset, meta.context_tokens = [], 0, 0
    meta.template["query_text"] = first_turn_template(adapter, has_image=False)
    if meta.template.get("query_image") is not None:
        meta.template["query_image"] = first_turn_template(adapter, has_image=True)
    return TaskMemory.empty(meta)
