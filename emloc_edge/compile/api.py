"""`compile_memory`: the Python API the `emloc-edge compile` command is a thin layer over."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence as Seq

from ..errors import BadInputError
from ..memory import TaskMemory
from ..models.base import ModelAdapter
from ..textout import comma_list
from .compressor import CompileOptions, Compressor, Progress
from .demos import Demo, check_demo_lengths, load_demos
from .device import resolve_device


def compile_memory(
    demos: str | Path | list[Demo],
    model: str | Path | ModelAdapter,
    *,
    output: str | Path | None = None,
    delta: float | None = None,
    ratios: Seq[float] | None = None,
    chunk_size: int | None = None,
    precision: str | None = None,
    append: str | Path | None = None,
    question: str | None = None,
    progress: Progress | None = None,
    policy: str | None = None,
    device: str = "auto",
    forced: str | None = None,
) -> TaskMemory:
    """Compress demonstrations into an EMLoC task memory (and save it to `output` if given).

    demos: a demos folder (demos.jsonl or <answer>/<image> layout) or a list of `Demo`.
    model: a local HF model folder, a .gguf file, or an adapter from `load_model`.
    policy: a name in `emloc_edge.compile.policy.POLICIES` ("emloc-context", the default: one search
    and one budget over the whole context; "emloc": chunk-wise, a profile verified per chunk;
    "emloc-paper", the authors' search; "uniform"). forced: which answer-span tokens every layer keeps
    ("answer": the whole span, the default; "answer+end": without the newline opening the turn;
    "content": the answer's own tokens only; see README "Which answer-span tokens must be kept").
    device: "auto" (CUDA when torch sees a GPU), "cpu" or "cuda".
    Options left as None take the defaults, or with `append` the existing memory's own
    settings; `append` compresses the demos as further chunks of that memory file, whose earlier
    chunks stay bit-identical.
    """
    from ..models.loading import load_model

    # Cheap checks first: a bad demos folder, memory file, option or output path should not wait for
    # the model to load (nor, for the output path, for the whole compile).
    where = None if isinstance(demos, list) else Path(demos)  # named in errors about the demonstrations
    if where is not None:
        demos = load_demos(where, question=question)
    existing = TaskMemory.load(append) if append is not None else None
    base = _settings_of(existing, append) if existing is not None else CompileOptions()
    options = CompileOptions(
        delta=base.delta if delta is None else delta,
        ratios=base.ratios if ratios is None else tuple(ratios),
        chunk_size=base.chunk_size if chunk_size is None else chunk_size,
        precision=base.precision if precision is None else precision,
        policy=base.policy if policy is None else policy,
        forced=base.forced if forced is None else forced,
    )
    if existing is not None:
        _check_same_settings(base, options, append)
    if output is not None:
        _check_output(Path(output))
    resolve_device(device)  # a bad or unavailable device fails before the model loads
    adapter = model if isinstance(model, ModelAdapter) else load_model(model)
    if existing is not None:
        existing.check_model(adapter.fingerprint(), append)
    count = lambda text: len(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    check_demo_lengths(demos, count, where)
    if not adapter.has_vision and any(d.image is not None for d in demos):
        first = next(d.image for d in demos if d.image is not None)
        raise BadInputError(f"{where or first}: {adapter.name} is a text-only model, but the demonstrations have images")
    try:
        memory = Compressor(adapter, options, device=device).compile(demos, existing=existing, progress=progress)
    except BadInputError as e:  # e.g. more positions than the model has: name the demos folder
        if where is None:
            raise
        raise BadInputError(f"{where}: {e}") from None
    if output is not None:
        memory.save(output)
    return memory


def _check_same_settings(memory: CompileOptions, given: CompileOptions, path: str | Path) -> None:
    """Appending keeps the memory's own settings; name the memory file and each option that differs."""
    fields = ("delta", "ratios", "chunk_size", "precision", "policy", "forced")
    diff = [f"{f} {_show(getattr(memory, f))} (given {_show(getattr(given, f))})"
            for f in fields if getattr(memory, f) != getattr(given, f)]
    if diff:
        raise BadInputError(f"{path}: appending needs the memory's own settings: {', '.join(diff)}; "
                            "leave these out or give the memory's values", parameters=[f.split()[0] for f in diff])


def _show(value: object) -> str:
    """A setting as the user gives it: ratios comma-separated, an unset option as "default"."""
    if isinstance(value, tuple):
        return comma_list(value)
    return "default" if value is None else str(value)


def _check_output(output: Path) -> None:
    if output.is_dir():
        raise BadInputError(f"{output}: is a folder; give a file name for the memory", parameters="output")
    if not output.parent.is_dir():
        raise BadInputError(f"{output}: output folder {output.parent} does not exist")


def _settings_of(memory: TaskMemory, path: str | Path) -> CompileOptions:
    """The settings `memory` (read from `path`) was compiled with; a file whose settings no compile
    accepts (e.g. an unknown policy) is named in the error."""
    h = memory.meta.hyperparameters
    try:
        return CompileOptions(
            delta=h["delta"], ratios=tuple(h["ratios"]), chunk_size=h["chunk_size"],
            precision=memory.meta.precision, policy=h.get("policy", "emloc"), forced=h.get("forced"),
        )
    except BadInputError as e:
        raise BadInputError(f"{path}: its settings: {e}") from None
