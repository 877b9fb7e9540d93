"""`evaluate`: answer the same held-out items with every condition's context and score the answers."""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Union

from ..compile.compressor import CompileOptions
from ..compile.demos import Demo, load_demos
from ..compile.divergence import js_divergence
from ..compile.policy import POLICIES
from ..errors import BadInputError
from ..models.base import ModelAdapter
from .backends import BACKENDS, Backend
from .conditions import Condition, Context, FullContext, Setup, make_condition
from .names import resolve_conditions
from .paired import compare
from .report import ConditionResult, EvalReport

ModelArg = Union[str, Path, ModelAdapter]
REFERENCE = FullContext.name  # JS divergence is measured against this condition's distributions
PROVIDERS = ("auto", "cpu", "cuda")  # also the torch devices


class EvalProgress(Protocol):
    def begin(self, total: int) -> None:
        """`total` queries will be scored (reported conditions × test items)."""

    def stage(self, text: str) -> None:
        """What is being done now, e.g. "building emloc-int8"."""

    def step(self) -> None:
        """One query scored."""


class _Silent:
    def begin(self, total: int) -> None:
        pass

    def stage(self, text: str) -> None:
        pass

    def step(self) -> None:
        pass


@dataclass
class Answered:
    """One memory's answers to every item (shared by conditions whose memories are identical)."""

    predictions: list[str]
    ms: list[float]
    ttft_ms: list[float | None]
    tokens_per_s: list[float | None]
    js: list[float]  # first-answer-token JS (nats) to the reference, per item


def evaluate(
    demos_dir: str | Path | list[Demo],
    test_dir: str | Path | list[Demo],
    model: ModelArg | Callable[[], ModelArg],
    *,
    conditions: Iterable[str] | str | None = None,
    delta: float | None = None,
    ratios: tuple[float, ...] | None = None,
    chunk_size: int | None = None,
    policy: str | None = None,
    forced: str | None = None,
    sweep: Iterable[str] | dict[str, Iterable[float]] | None = None,
    backend: str = "ort",
    weights: str | None = None,
    provider: str = "auto",
    threads: int = 0,
    device: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 16,
    question: str | None = None,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Score greedy answers, first-answer-token JS to full context and speed of each condition.

    demos_dir / test_dir: demos folders (demos.jsonl or <answer>/<image>) or lists of `Demo`; the test
    items' answers are the references. model: a model folder, .gguf file, adapter from `load_model`,
    or a zero-argument callable returning one (called only once the inputs have been checked).
    conditions: names as in conditions.py (default: zero-shot, full-context, POLICY-fp32, POLICY-int8,
    uniform-int8, POLICY being `policy`, default the compiler's). sweep: "delta=0.001,0.02" /
    "ratio=0.1,0.25" strings (or {knob: values}) adding each value as a condition per asked policy that
    takes that knob. forced: the answer-span tokens every compile forces (as `compile_memory`'s).
    backend: "ort" (the exported model with `weights`, default export's own, under ONNX Runtime with
    `provider` and `threads`) or "torch" (the PyTorch reference on `device`).
    full-context is always built, since JS is measured against it; only asked conditions are reported.
    """
    progress = progress or _Silent()
    options = _options(delta, ratios, chunk_size, policy, forced)
    names = resolve_conditions(conditions, options.policy, sweep)
    weights = _check_runtime(backend, weights, provider, threads, device, limit, max_new_tokens)
    demos = _load(demos_dir, question, "demos")
    items = _load(test_dir, question, "test")[:limit]

    from ..models.loading import load_model

    model = model() if callable(model) and not isinstance(model, ModelAdapter) else model
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    _check_images(adapter, demos_dir, demos, question)
    _check_images(adapter, test_dir, items, question)

    made = {n: make_condition(n, options.policy) for n in [REFERENCE, *names]}
    with tempfile.TemporaryDirectory(prefix="emloc-eval-") as folder:
        setup, built = Setup(adapter, demos, options, Path(folder), device), {}
        progress.begin(len(names) * len(items))
        # the export first: a model that cannot be exported fails before the compiles
        answerer = BACKENDS[backend].open(adapter, weights=weights, provider=provider, threads=threads,
                                          device=device, progress=progress.stage)
        for name in [REFERENCE, *names]:
            _build(name, made, setup, built, progress, demos_dir)
        answered = _answer_all(answerer, names, built, items, max_new_tokens, progress)
        runtime = {**answerer.describe(), "compile_device": device or "the compiler's default"}
    results = [_score(made[n], built[n], items, answered[built[n].key], built[REFERENCE], runtime) for n in names]
    _pair_with_reference(results)
    answers = {d.answer.strip() for d in demos}
    return EvalReport(
        model=adapter.name, demos=len(demos), test_items=len(items),
        context_tokens=built[REFERENCE].memory.meta.context_tokens, distinct_answers=len(answers),
        chance=1.0 / len(answers), runtime=runtime,
        settings={"delta": options.delta, "ratios": list(options.keep_ratios), "chunk_size": options.chunk_size,
                  "policy": options.policy, "forced": options.forced, "max_new_tokens": max_new_tokens, "limit": limit, "reference": REFERENCE},
        conditions=results,
        items=[{"question": i.question, "answer": i.answer, "image": None if i.image is None else str(i.image)}
               for i in items],
    )


# --- checks -----------------------------------------------------------------------------------------
def _options(delta, ratios, chunk_size, policy, forced) -> CompileOptions:
    defaults = CompileOptions()
    if policy is not None and policy not in POLICIES:
        raise BadInputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}", parameters="policy")
    return CompileOptions(
        delta=defaults.delta if delta is None else delta,
        ratios=defaults.ratios if ratios is None else tuple(ratios),
        chunk_size=defaults.chunk_size if chunk_size is None else chunk_size,
        policy=defaults.policy if policy is None else policy,
        forced=forced,
    )


def _check_runtime(backend: str, weights: str | None, provider: str, threads: int, device: str | None, limit,
                   max_new_tokens) -> str:
    """The export's weights (its default when None), after checking the run's simple options."""
    from ..export.api import WEIGHTS
    from .exports import default_weights

    if backend not in BACKENDS:
        raise BadInputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}", parameters="backend")
    weights = default_weights() if weights is None else weights
    if weights not in WEIGHTS:
        raise BadInputError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}", parameters="weights")
    if provider not in PROVIDERS:
        raise BadInputError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}", parameters="provider")
    if device not in (None, *PROVIDERS):
        raise BadInputError(f"device must be one of {', '.join(PROVIDERS)}, got {device!r}", parameters="device")
    if threads < 0:
        raise BadInputError(f"threads must be 0 (ONNX Runtime decides) or more, got {threads}", parameters="threads")
    if limit is not None and limit < 1:
        raise BadInputError(f"limit must be at least 1, got {limit}", parameters="limit")
    if max_new_tokens < 1:
        raise BadInputError(f"max-new-tokens must be at least 1, got {max_new_tokens}", parameters="max_new_tokens")
    return weights


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


# --- steps ------------------------------------------------------------------------------------------
def _build(name: str, made: dict[str, Condition], setup: Setup, built: dict[str, Context], progress: EvalProgress,
           where) -> Context:
    """`name`'s context, building what it needs first; each condition is built once."""
    if name not in built:
        condition = made.setdefault(name, make_condition(name, setup.options.policy))
        for need in condition.needs():
            _build(need, made, setup, built, progress, where)
        progress.stage(f"building {name}")
        try:
            built[name] = condition.build(setup, built)
        except BadInputError as e:  # e.g. more positions than the model has: name the demos folder
            if isinstance(where, list):
                raise
            raise BadInputError(f"{where}: {e}") from None
    return built[name]


def _answer_all(answerer: Backend, names: list[str], built: dict[str, Context], items: list[Demo],
                max_new_tokens: int, progress: EvalProgress) -> dict[str, Answered]:
    """Answers per memory (by context key), the reference first: every JS is measured against it."""
    reference, answered = built[REFERENCE], {}
    if REFERENCE in names:
        answered[reference.key], ref = _answer(answerer, REFERENCE, reference, items, max_new_tokens, None, progress)
    else:
        progress.stage(f"{REFERENCE} (reference distributions)")
        ref = answerer.logprobs(reference, items)
    for name in names:
        ctx = built[name]
        if ctx.key not in answered:
            answered[ctx.key], _ = _answer(answerer, name, ctx, items, max_new_tokens, ref, progress)
        elif name != REFERENCE:  # an identical memory was answered already
            for _ in items:
                progress.step()
    return answered


def _answer(answerer: Backend, name: str, ctx: Context, items: list[Demo], max_new_tokens: int, ref,
            progress: EvalProgress):
    """(answers, first-answer-token log-probabilities); `ref` None: JS against these very answers."""
    progress.stage(name)
    out, logprobs = Answered([], [], [], [], []), []
    for k, reply in enumerate(answerer.replies(ctx, items, max_new_tokens)):
        against = reply.logprobs if ref is None else ref[k]
        out.predictions.append(reply.text)
        out.ms.append(reply.ms)
        out.ttft_ms.append(reply.ttft_ms)
        out.tokens_per_s.append(reply.tokens_per_s)
        out.js.append(float(js_divergence(reply.logprobs[None], against[None])))  # [1, V] against [1, V]
        if ref is None:  # only the reference's are kept
            logprobs.append(reply.logprobs)
        progress.step()
    return out, logprobs


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _score(condition: Condition, ctx: Context, items: list[Demo], a: Answered, reference: Context,
           runtime: dict) -> ConditionResult:
    correct = [p == item.answer.strip() for p, item in zip(a.predictions, items)]
    kept = ctx.kept_tokens_per_layer
    context_tokens = ctx.memory.meta.context_tokens
    mean_kept = sum(kept) / len(kept)
    return ConditionResult(
        name=condition.name, line=condition.line, correct=sum(correct), total=len(items),
        accuracy=sum(correct) / len(items), memory_bytes=ctx.memory_bytes,
        precision=ctx.memory.meta.precision if ctx.memory_bytes else None,
        size_vs_full_context=ctx.memory_bytes / reference.memory_bytes,
        weights=runtime["weights"], kept_tokens_per_layer=kept, mean_kept_tokens_per_layer=mean_kept,
        kept_fraction=mean_kept / context_tokens if context_tokens else 0.0,
        ms_per_query=statistics.median(a.ms), ttft_ms=_median(a.ttft_ms), tokens_per_s=_median(a.tokens_per_s),
        js_to_full_context=sum(a.js) / len(a.js), compile_seconds=ctx.compile_seconds,
        settings=_settings(ctx), predictions=a.predictions, correct_items=correct,
    )


def _pair_with_reference(results: list[ConditionResult]) -> None:
    """Set each condition's items lost and won against full-context's, when full-context was answered too."""
    reference = next((r for r in results if r.name == REFERENCE), None)
    for r in results if reference is not None else ():
        if r is not reference:
            paired = compare(reference.correct_items, r.correct_items)
            r.lost_to_full_context, r.won_over_full_context = paired.lost, paired.won
            r.p_vs_full_context = paired.p_value


def _settings(ctx: Context) -> dict | None:
    if not ctx.memory_bytes:
        return None
    return {**ctx.memory.meta.hyperparameters, "precision": ctx.memory.meta.precision}
