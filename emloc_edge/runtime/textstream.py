"""Streaming decoded text so that the pieces join to exactly the final answer text."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

_HELD = "\ufffd"  # what a tokenizer shows for bytes of a character that is not complete yet


def stream_text(decode: Callable[[list[int]], str], tokens: Iterable[int]) -> Iterator[str]:
    """Yield pieces of `decode(ids).strip()` as `tokens` arrive; "".join(pieces) == decode(all ids).strip().

    A trailing incomplete character (U+FFFD) and trailing whitespace are held back until more text
    follows them, or until the end, where whatever is left is yielded (so nothing is dropped).
    """
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        stable = decode(ids).strip().rstrip(_HELD).rstrip()
        if len(stable) > len(shown) and stable.startswith(shown):
            yield stable[len(shown):]
            shown = stable
    final = decode(ids).strip()
    if final.startswith(shown) and len(final) > len(shown):
        yield final[len(shown):]
