"""Rendering demonstrations and queries with the model's own chat template.

Nothing here hard-codes a template: every piece (where a turn starts, where the generation prompt
ends, which token closes an assistant turn) is found by rendering small probe conversations with
`tokenizer.apply_chat_template` and comparing the strings. The only assumption is that a turn
renders the same whatever came before it (true of ChatML-style templates); `check_concatenation`
verifies it on the real demonstrations at compile time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ModelLoadError

Message = dict  # {"role": "user" | "assistant", "content": ...}

# Stand-ins used only to discover template pieces; they never reach a model.
_PROBE_Q, _PROBE_A = "x", "y"
QUESTION_SLOT = "{question}"


@dataclass(frozen=True)
class Piece:
    """Rendered text of one conversation part, with the char span whose tokens count as the answer."""

    text: str
    answer_span: tuple[int, int] | None  # [start, end) in `text`; None for a query


class ChatTemplate:
    def __init__(self, tokenizer, user_content: Callable[[str, bool], object]) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"tokenizer of {tokenizer.name_or_path!r} has no chat template")
        self.tokenizer = tokenizer
        self.user_content = user_content
        self._probe = [self._user(_PROBE_Q, False), {"role": "assistant", "content": _PROBE_A}]
        self._probe_text = self.render(self._probe)
        self.end_of_turn, self.end_of_turn_id = self._find_end_of_turn()

    # --- primitives -----------------------------------------------------------------------------
    def _user(self, question: str, has_image: bool) -> Message:
        return {"role": "user", "content": self.user_content(question, has_image)}

    def render(self, messages: list[Message], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _after_probe(self, messages: list[Message], generation_prompt: bool = False) -> str:
        """Text `messages` add after a probe demonstration: a turn's rendering without the system turn."""
        full = self.render(self._probe + messages, generation_prompt)
        if not full.startswith(self._probe_text):
            raise ModelLoadError("chat template is not prefix-stable: a turn re-renders earlier turns")
        return full[len(self._probe_text) :]

    def _find_end_of_turn(self) -> tuple[str, int]:
        """The token that closes an assistant turn, e.g. `<|im_end|>`."""
        user = [self._user(_PROBE_Q, False)]
        prompt = self.render(user, generation_prompt=True)
        full = self.render(user + [{"role": "assistant", "content": _PROBE_A}])
        tail = full[len(prompt) :] if full.startswith(prompt) else ""
        cut = tail.find(_PROBE_A)
        rest = tail[cut + len(_PROBE_A) :] if cut >= 0 else ""
        ids = self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest.strip() else []
        if not ids:
            raise ModelLoadError("cannot find the end-of-turn token in the chat template")
        return self.tokenizer.decode(ids[:1]), ids[0]

    # --- demonstrations -------------------------------------------------------------------------
    def demo_piece(self, question: str, answer: str, has_image: bool, with_system: bool) -> Piece:
        """One demonstration as a user turn + assistant turn.

        The answer span runs from the last character of the generation prompt (its token's logits
        predict the first answer token) through the end-of-turn token, as in the EMLoC reference.
        """
        user = self._user(question, has_image)
        turn = [user, {"role": "assistant", "content": answer}]
        if with_system:
            text, prompt = self.render(turn), self.render([user], generation_prompt=True)
        else:
            text, prompt = self._after_probe(turn), self._after_probe([user], generation_prompt=True)
        if not text.startswith(prompt):
            raise ModelLoadError("chat template renders the generation prompt differently from a reply")
        eot = text.find(self.end_of_turn, len(prompt))
        if eot < 0:
            raise ModelLoadError("chat template does not close the assistant turn with its end-of-turn token")
        return Piece(text, (len(prompt) - 1, eot + len(self.end_of_turn)))

    def check_concatenation(self, pieces: list[Piece], messages: list[Message]) -> None:
        """The demo pieces must concatenate to the whole conversation exactly as the template renders it."""
        if "".join(p.text for p in pieces) != self.render(messages):
            raise ModelLoadError(
                "chat template renders turns depending on earlier turns; chunked compilation needs "
                "a template where each turn renders on its own (ChatML-style)"
            )

    def messages(self, demos) -> list[Message]:
        """The whole conversation of demonstrations (objects with question/answer/image)."""
        out: list[Message] = []
        for d in demos:
            out += [self._user(d.question, d.image is not None), {"role": "assistant", "content": d.answer}]
        return out

    # --- queries --------------------------------------------------------------------------------
    def query_piece(self, question: str, has_image: bool) -> Piece:
        """The query turn after the demonstrations: user turn + generation prompt, no system turn."""
        return Piece(self._after_probe([self._user(question, has_image)], generation_prompt=True), None)

    def query_template(self, has_image: bool) -> tuple[str, str]:
        """(prefix, suffix) around the question text; the runtime renders `prefix + question + suffix`."""
        text = self.query_piece(QUESTION_SLOT, has_image).text
        if text.count(QUESTION_SLOT) != 1:
            raise ModelLoadError("chat template alters the question text; cannot derive query pieces")
        prefix, suffix = text.split(QUESTION_SLOT)
        return prefix, suffix

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, piece: Piece) -> tuple[list[int], list[bool]]:
        """Token ids of a piece and, per token, whether it overlaps the piece's answer span."""
        enc = self.tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if piece.answer_span is None:
            return ids, [False] * len(ids)
        lo, hi = piece.answer_span
        return ids, [start < hi and end > lo for start, end in offsets]
