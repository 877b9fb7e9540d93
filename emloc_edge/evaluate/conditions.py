"""The contexts a query can be answered with: one small class per kind, the kind selected by name.

    zero-shot            no demonstrations: the query is the conversation's first user turn
    full-context         every demonstration, nothing pruned (every token kept), fp32
    POLICY-PRECISION     the demos compiled with any registered policy (compile/policy.py POLICIES),
                         stored int8 | fp16 | fp32, e.g. emloc-int8, emloc-paper-fp32, uniform-int8
    ...@KNOB=VALUE       the same at one setting of the policy's knob (what --sweep adds), e.g.
                         emloc-int8@delta=0.02, uniform-int8@ratio=0.25

A policy's knob is read from its constructor: `delta` (a divergence tolerance: a searched policy) or
`ratio` (a kept fraction: a budgeted one). Without `@`, a searched policy takes the run's delta and a
budgeted one is sized like the run's main policy at the same precision (uniform-int8: as big as
emloc-int8). Identical compile settings are compiled once and share one memory file.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from ..compile.compressor import CompileOptions, Compressor
from ..compile.demos import Demo
from ..compile.policy import POLICIES
from ..errors import BadInputError
from ..memory import PRECISIONS, TaskMemory

FULL_CONTEXT_POLICY = "uniform"  # at ratio 1.0 it keeps every token, whatever the other policies do


@dataclass
class Setup:
    """What every condition is built from."""

    adapter: object  # ModelAdapter
    demos: list[Demo]
    options: CompileOptions  # the run's settings: delta, ratios, chunk size, main policy
    folder: Path  # where memory files are written (a temporary folder the caller removes)
    device: str | None = None  # torch device for compile (None: the compiler's default)
    compiled: dict[str, "Context"] = field(default_factory=dict)  # by compile settings

    def compile(self, **overrides) -> "Context":
        """The demos compiled with `options` changed by `overrides`; compiled once per distinct setting."""
        options = dataclasses.replace(self.options, **overrides)  # re-validated by CompileOptions.__post_init__
        key = repr(sorted({**options.hyperparameters(), "precision": options.precision}.items()))
        if key not in self.compiled:
            started = time.perf_counter()
            memory = compile_demos(self.adapter, self.demos, options, self.device)
            seconds = time.perf_counter() - started
            path = self.folder / f"memory-{len(self.compiled)}.emloc"
            memory.save(path)
            self.compiled[key] = Context(memory, path, False, seconds, path.stat().st_size, key)
        return self.compiled[key]


def compile_demos(adapter, demos: list[Demo], options: CompileOptions, device: str | None) -> TaskMemory:
    """The one place eval calls the compiler (policy by name in `options`; `device` passed through)."""
    if device is None or "device" not in inspect.signature(Compressor).parameters:
        if device not in (None, "auto", "cpu"):  # a compiler without devices runs on the CPU
            raise BadInputError(f"device {device!r}: this build's compiler runs on the CPU only")
        return Compressor(adapter, options).compile(demos)
    return Compressor(adapter, options, device=device).compile(demos)


@dataclass
class Context:
    """A built condition: the memory its queries attend to, saved as the file `compile` writes."""

    memory: TaskMemory  # zero-shot: an empty memory whose template renders the query as the first turn
    path: Path  # the memory file (what ONNX Runtime loads)
    first_turn: bool  # query rendered with the template's system turn (nothing before it)
    compile_seconds: float
    memory_bytes: int  # size of the saved memory file (0: no memory)
    key: str  # contexts with one key hold the same memory: their answers are the same

    @property
    def kept_tokens_per_layer(self) -> list[int]:
        return self.memory.meta.kept_tokens_per_layer


class Condition(Protocol):
    name: str
    line: str | None  # the plot line it belongs to (POLICY-PRECISION); None: a point of its own

    def needs(self) -> tuple[str, ...]: ...

    def build(self, setup: Setup, built: dict[str, Context]) -> Context: ...


@dataclass
class ZeroShot:
    name: ClassVar[str] = "zero-shot"
    line: ClassVar[None] = None

    def needs(self) -> tuple[str, ...]:
        return (FullContext.name,)  # its memory is full-context's, emptied: same model, geometry and template

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        from .zero_shot import empty_first_turn_memory

        memory = empty_first_turn_memory(setup.adapter, built[FullContext.name].memory)
        path = setup.folder / "zero-shot.emloc"
        memory.save(path)
        return Context(memory, path, True, 0.0, 0, "zero-shot")


@dataclass
class FullContext:
    name: ClassVar[str] = "full-context"
    line: ClassVar[None] = None

    def needs(self) -> tuple[str, ...]:
        return ()

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        return setup.compile(policy=FULL_CONTEXT_POLICY, ratios=(1.0,), precision="fp32")


@dataclass
class Searched:
    """A policy that searches under a divergence tolerance (emloc, emloc-paper): the run's delta or its own."""

    name: str
    policy: str
    precision: str
    value: float | None = None  # delta

    @property
    def line(self) -> str:
        return f"{self.policy}-{self.precision}"

    def needs(self) -> tuple[str, ...]:
        return ()

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        delta = setup.options.delta if self.value is None else self.value
        return setup.compile(policy=self.policy, precision=self.precision, delta=delta)


@dataclass
class Budgeted:
    """A policy told what fraction to keep (uniform, ...): its own, or the main policy's kept fraction."""

    name: str
    policy: str
    precision: str
    value: float | None = None  # ratio
    main: str = ""  # the run's main policy, whose memory sets the size when no ratio is given

    @property
    def line(self) -> str:
        return f"{self.policy}-{self.precision}"

    def _sized_like(self) -> str | None:
        if self.value is not None or policy_knob(self.main) != "delta":
            return None
        return f"{self.main}-{self.precision}"

    def needs(self) -> tuple[str, ...]:
        like = self._sized_like()
        return (like,) if like else ()

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        like = self._sized_like()
        # mean kept tokens per layer / context tokens of the sized-like memory: the same size, spread evenly
        ratio = (built[like].memory.meta.compression if like else
                 setup.options.keep_ratios[0] if self.value is None else self.value)
        return setup.compile(policy=self.policy, precision=self.precision, ratios=(ratio,))


KINDS: dict[str, type] = {"delta": Searched, "ratio": Budgeted}  # a policy's knob -> its condition kind
FIXED: dict[str, type] = {ZeroShot.name: ZeroShot, FullContext.name: FullContext}


@functools.lru_cache(maxsize=None)
def policy_knob(policy: str) -> str:
    """`delta` or `ratio`: the first of KINDS that the policy, as the compiler makes it, has."""
    made = CompileOptions(policy=policy).make_policy()
    knob = next((k for k in KINDS if hasattr(made, k)), None)
    if knob is None:
        raise BadInputError(f"policy {policy!r} takes neither delta nor ratio; eval cannot set its size")
    return knob


def default_names(main: str) -> list[str]:
    """The report's conditions when none are asked for, in report order."""
    return [ZeroShot.name, FullContext.name, f"{main}-fp32", f"{main}-int8", "uniform-int8"]


def make_condition(name: str, main: str) -> Condition:
    """The condition called `name` (see the module docstring); BadInputError names what is wrong."""
    if name in FIXED:
        return FIXED[name]()
    base, _, setting = name.partition("@")
    policy, _, precision = base.rpartition("-")
    if policy not in POLICIES or precision not in PRECISIONS:
        raise BadInputError(f"conditions: unknown condition {name!r} (zero-shot, full-context or POLICY-PRECISION "
                            f"with POLICY one of {', '.join(POLICIES)} and PRECISION one of {', '.join(PRECISIONS)})", parameters="conditions")
    knob = policy_knob(policy)
    value = None
    if setting:
        key, _, text = setting.partition("=")
        if key != knob:
            raise BadInputError(f"conditions: {name!r}: policy {policy} takes {knob}=VALUE, not {key!r}", parameters="conditions")
        value = _number(text, f"conditions: {name!r}")
    extra = {"main": main} if KINDS[knob] is Budgeted else {}
    return KINDS[knob](name=name, policy=policy, precision=precision, value=value, **extra)


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInputError(f"{where}: expected a number, got {text!r}") from None
