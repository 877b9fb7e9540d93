"""`evaluate`: answer the same held-out items with every condition's context and score the answers."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol, Union

import torch

from ..compile.compressor import CompileOptions
from ..compile.demos import Demo, load_demos
from ..compile.divergence import js_divergence
from ..compile.query import greedy_answer_and_logits, query_logits
from ..errors import BadInputError
from ..models.base import ModelAdapter
from .conditions import CONDITION_NAMES, CONDITIONS, REFERENCE, Context, Setup
from .report import ConditionResult, EvalReport

ModelArg = Union[str, Path, ModelAdapter]


class EvalProgress(Protocol):
    def begin(self, total: int) -> None:
        """`total` queries will be scored (reported conditions × test items)."""

    def stage(self, text: str) -> None:
        """What is being done now, e.g. "compiling emloc-int8"."""

    def step(self) -> None:
        """One query scored."""


class _Silent:
    def begin(self, total: int) -> None:
        pass

    def stage(self, text: str) -> None:
        pass

    def step(self) -> None:
        pass


def resolve_conditions(names: Iterable[str] | str | None) -> list[str]:
    """Requested condition names (a list or a comma list), checked, deduplicated, in report order."""
    if names is None:
        return list(CONDITION_NAMES)
    if isinstance(names, str):
        names = names.split(",")
    asked = [n.strip() for n in names if n.strip()]
    unknown = [n for n in asked if n not in CONDITIONS]
    if unknown:
        raise BadInputError(f"conditions: unknown condition {unknown[0]!r} (choose from {', '.join(CONDITION_NAMES)})",
                            parameters="conditions")
    if not asked:
        raise BadInputError(f"conditions: no condition given (choose from {', '.join(CONDITION_NAMES)})",
                            parameters="conditions")
    return [n for n in CONDITION_NAMES if n in asked]


def evaluate(
    demos_dir: str | Path | list[Demo],
    test_dir: str | Path | list[Demo],
    model: ModelArg | Callable[[], ModelArg],
    *,
    conditions: Iterable[str] | str | None = None,
    delta: float | None = None,
    ratios: tuple[float, ...] | None = None,
    chunk_size: int | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
    question: str | None = None,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Score greedy answers, first-answer-token JS to full context and speed of each condition.

    demos_dir / test_dir: demos folders (demos.jsonl or <answer>/<image>) or lists of `Demo`; the test
    items' answers are the references. model: a model folder, .gguf file, adapter from `load_model`,
    or a zero-argument callable returning one (called only once the inputs have been checked).
    conditions: subset of CONDITION_NAMES (default all). full-context is always built, since JS is
    measured against it, and emloc-int8 whenever uniform-int8 is asked for (it sets uniform's ratio);
    only the asked conditions are scored and reported. Options left None take CompileOptions defaults.
    """
    progress = progress or _Silent()
    names = resolve_conditions(conditions)
    if limit is not None and limit < 1:
        raise BadInputError(f"limit must be at least 1, got {limit}", parameters="limit")
    if max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}", parameters="max_new_tokens")
    defaults = CompileOptions()
    options = CompileOptions(
        delta=defaults.delta if delta is None else delta,
        ratios=defaults.ratios if ratios is None else tuple(ratios),
        chunk_size=defaults.chunk_size if chunk_size is None else chunk_size,
    )
    demos = _load(demos_dir, question, "demos")
    items = _load(test_dir, question, "test")[:limit]

    from ..models.loading import load_model

    model = model() if callable(model) and not isinstance(model, ModelAdapter) else model
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    _check_images(adapter, demos_dir, demos, question)
    _check_images(adapter, test_dir, items, question)

    setup, built = Setup(adapter, demos, options), {}
    progress.begin(len(names) * len(items))
    answered = {name: _answer(name, _build(name, setup, built, progress, demos_dir), adapter, items, max_new_tokens, progress)
                for name in names}
    reference = (answered[REFERENCE][2] if REFERENCE in answered else
                 [_logprobs(adapter, _build(REFERENCE, setup, built, progress, demos_dir), item) for item in items])
    results = [_score(name, built[name], items, *answered[name], reference) for name in names]
    answers = {d.answer.strip() for d in demos}
    return EvalReport(
        model=adapter.name, demos=len(demos), test_items=len(items),
        context_tokens=built[REFERENCE].memory.meta.context_tokens, distinct_answers=len(answers),
        chance=1.0 / len(answers),
        settings={"delta": options.delta, "ratios": list(options.ratios), "chunk_size": options.chunk_size,
                  "max_new_tokens": max_new_tokens, "limit": limit, "reference": REFERENCE},
        conditions=results,
        items=[{"question": i.question, "answer": i.answer, "image": None if i.image is None else str(i.image)}
               for i in items],
    )


# --- steps ------------------------------------------------------------------------------------------
def _load(source: str | Path | list[Demo], question: str | None, role: str) -> list[Demo]:
    if isinstance(source, list):
        if not source:
            raise BadInputError(f"no {role} items given")
        return list(source)
    if not Path(source).exists():
        raise BadInputError(f"{source}: {role} folder not found")
    return load_demos(Path(source), question=question)


def _check_images(adapter: ModelAdapter, source, demos: list[Demo], question: str | None) -> None:
    """A text-only model cannot take images: re-read the folder as text-only for the precise message."""
    if adapter.has_vision or all(d.image is None for d in demos):
        return
    if not isinstance(source, list):
        load_demos(Path(source), question=question, needs_images=False)  # raises, naming file and line
    first = next(d.image for d in demos if d.image is not None)
    raise BadInputError(f"{first}: {adapter.name} is a text-only model, but the items have images")


def _build(name: str, setup: Setup, built: dict[str, Context], progress: EvalProgress, where) -> Context:
    """`name`'s context, building what it needs first; each condition is built once."""
    if name not in built:
        condition = CONDITIONS[name]
        for need in condition.needs:
            _build(need, setup, built, progress, where)
        progress.stage(f"building {name}")
        try:
            built[name] = condition.build(setup, built)
        except BadInputError as e:  # e.g. more positions than the model has: name the demos folder
            if isinstance(where, list):
                raise
            raise BadInputError(f"{where}: {e}") from None
    return built[name]


def _logprobs(adapter: ModelAdapter, ctx: Context, item: Demo) -> torch.Tensor:
    """Next-token log-probabilities [V] at the first answer position."""
    logits = query_logits(adapter, ctx.kv, ctx.position_offset, item.question, item.image, first_turn=ctx.first_turn)
    return logits.float().log_softmax(-1)


def _answer(name: str, ctx: Context, adapter: ModelAdapter, items: list[Demo], max_new_tokens: int,
            progress: EvalProgress) -> tuple[list[str], list[float], list[torch.Tensor]]:
    """Greedy answers, wall ms per query, and first-answer-token log-probabilities [V] per item."""
    progress.stage(name)
    predictions, ms, logprobs = [], [], []
    for item in items:
        started = time.perf_counter()
        ids, logits = greedy_answer_and_logits(adapter, ctx.kv, ctx.position_offset, item.question, item.image,
                                               max_new_tokens=max_new_tokens, first_turn=ctx.first_turn)
        ms.append(1000 * (time.perf_counter() - started))
        predictions.append(adapter.tokenizer.decode(ids, skip_special_tokens=True).strip())
        logprobs.append(logits.float().log_softmax(-1))
        progress.step()
    return predictions, ms, logprobs


def _score(name: str, ctx: Context, items: list[Demo], predictions: list[str], ms: list[float],
           logprobs: list[torch.Tensor], reference: list[torch.Tensor]) -> ConditionResult:
    js = [js_divergence(lp[None], ref[None]) for lp, ref in zip(logprobs, reference)]  # [1, V] against [1, V]
    correct = [p == item.answer.strip() for p, item in zip(predictions, items)]
    kept = ctx.kept_tokens_per_layer
    context_tokens = ctx.memory.meta.context_tokens if ctx.memory is not None else 0
    mean_kept = sum(kept) / len(kept)
    return ConditionResult(
        name=name, correct=sum(correct), total=len(items), accuracy=sum(correct) / len(items),
        memory_bytes=ctx.memory_bytes, kept_tokens_per_layer=kept, mean_kept_tokens_per_layer=mean_kept,
        kept_fraction=mean_kept / context_tokens if context_tokens else 0.0,
        ms_per_query=statistics.median(ms), js_to_full_context=sum(js) / len(js),
        compile_seconds=ctx.compile_seconds,
        settings=_settings(ctx), predictions=predictions, correct_items=correct,
    )


def _settings(ctx: Context) -> dict | None:
    if ctx.memory is None:
        return None
    return {**ctx.memory.meta.hyperparameters, "precision": ctx.memory.meta.precision}
