"""The contexts a query can be answered with, one small class per condition, selected by name.

    zero-shot     no demonstrations: the query is the conversation's first user turn (with the system turn)
    full-context  every demonstration, nothing pruned (delta < 0), fp32: equals plain transformers
    emloc-fp32    EMLoC at the given delta / ratios / chunk size, stored fp32
    emloc-int8    the same, stored int8 (what `compile` writes by default)
    uniform-int8  SnapKV-style baseline: same scores, one ratio in every layer, int8, ratio chosen so its
                  mean kept tokens per layer match emloc-int8's (equal memory size)

A condition may need others built first (`needs`); `build` gets them in `built`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..compile.compressor import CompileOptions, Compressor
from ..compile.demos import Demo
from ..compile.query import memory_kv
from ..memory import TaskMemory
from ..models.base import ModelAdapter
from ..models.decoder import LayerKV


@dataclass
class Setup:
    """What every condition is built from."""

    adapter: ModelAdapter
    demos: list[Demo]
    options: CompileOptions  # EMLoC settings (delta, ratios, chunk size); precision/policy set per condition


@dataclass
class Context:
    """A built condition: the prefix its queries attend to and what it cost."""

    kv: list[LayerKV]  # per layer [kv, n_l, hd] float32, as the memory file holds it
    position_offset: int  # position the query starts at
    first_turn: bool  # query rendered with the template's system turn (nothing before it)
    memory: TaskMemory | None
    compile_seconds: float
    memory_bytes: int  # size of the saved memory file (0: no memory)

    @property
    def kept_tokens_per_layer(self) -> list[int]:
        return [len(layer) for layer in self.kv]


class Condition(Protocol):
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]

    def build(self, setup: Setup, built: dict[str, Context]) -> Context: ...


class ZeroShot:
    name: ClassVar[str] = "zero-shot"
    needs: ClassVar[tuple[str, ...]] = ()

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        g = setup.adapter.geometry
        kv = [LayerKV.empty(g.num_kv_heads, g.head_dim) for _ in range(g.num_layers)]  # [kv, 0, hd] each
        return Context(kv, 0, True, None, 0.0, 0)


class FullContext:
    name: ClassVar[str] = "full-context"
    needs: ClassVar[tuple[str, ...]] = ()

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        return compiled(setup, delta=-1.0, precision="fp32", policy="emloc")  # delta < 0: keep every token


class EmlocFp32:
    name: ClassVar[str] = "emloc-fp32"
    needs: ClassVar[tuple[str, ...]] = ()
    precision: ClassVar[str] = "fp32"

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        return compiled(setup, precision=self.precision, policy="emloc")


class EmlocInt8(EmlocFp32):
    name: ClassVar[str] = "emloc-int8"
    precision: ClassVar[str] = "int8"


class UniformInt8:
    name: ClassVar[str] = "uniform-int8"
    needs: ClassVar[tuple[str, ...]] = (EmlocInt8.name,)

    def build(self, setup: Setup, built: dict[str, Context]) -> Context:
        # mean kept tokens per layer / context tokens of emloc-int8: the same memory size, spread evenly
        ratio = built[EmlocInt8.name].memory.meta.compression
        return compiled(setup, ratios=(ratio,), precision="int8", policy="uniform")


CONDITIONS: dict[str, Condition] = {c.name: c() for c in (ZeroShot, FullContext, EmlocFp32, EmlocInt8, UniformInt8)}
CONDITION_NAMES: tuple[str, ...] = tuple(CONDITIONS)  # the report's order
REFERENCE = FullContext.name  # JS divergence is measured against this condition's distributions


def compiled(setup: Setup, **overrides) -> Context:
    """Compile the demos with `setup.options` changed by `overrides`; time it and measure the saved file."""
    options = dataclasses.replace(setup.options, **overrides)  # re-validated by CompileOptions.__post_init__
    started = time.perf_counter()
    memory = Compressor(setup.adapter, options).compile(setup.demos)
    seconds = time.perf_counter() - started
    return Context(memory_kv(memory), memory.meta.position_offset, False, memory, seconds, file_bytes(memory))


def file_bytes(memory: TaskMemory) -> int:
    """Bytes of the memory saved as a file (written to a temporary folder, then removed)."""
    with tempfile.TemporaryDirectory(prefix="emloc-eval-") as folder:
        path = os.path.join(folder, "memory.emloc")
        memory.save(path)
        return os.path.getsize(path)
