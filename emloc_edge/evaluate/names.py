"""Which conditions a run reports: the asked names (or the defaults), each --sweep value added per
policy that takes the swept knob, checked up front and put in report order."""
from __future__ import annotations

import math
from typing import Iterable

from ..compile.policy import POLICIES
from ..errors import BadInputError
from .conditions import KINDS, default_names, make_condition, policy_knob

Sweep = dict[str, tuple[float, ...]]  # knob ("delta" | "ratio") -> values


def parse_sweep(sweep: Iterable[str] | dict[str, Iterable[float]] | None) -> Sweep:
    """{"delta": (...), "ratio": (...)} from "delta=0.001,0.02"-style strings (or such a dict)."""
    if sweep is None:
        return {}
    pairs = sweep.items() if isinstance(sweep, dict) else (_split(s) for s in sweep)
    out: Sweep = {}
    for knob, values in pairs:
        if knob not in KINDS:
            raise BadInputError(f"sweep: unknown knob {knob!r} (choose from {', '.join(KINDS)})", parameters="sweep")
        values = tuple(_value(knob, v) for v in values)
        if not values:
            raise BadInputError(f"sweep {knob}: no values given", parameters="sweep")
        out[knob] = tuple(dict.fromkeys(out.get(knob, ()) + values))
    return out


def _split(spec: str) -> tuple[str, list[str]]:
    knob, sep, values = spec.partition("=")
    if not sep:
        raise BadInputError(f"sweep: expected KNOB=V1,V2,... (e.g. delta=0.001,0.02), got {spec!r}", parameters="sweep")
    return knob.strip(), [v for v in values.split(",") if v.strip()]


def _value(knob: str, v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise BadInputError(f"sweep {knob}: expected numbers, got {v!r}", parameters="sweep") from None
    if math.isnan(x) or (knob == "ratio" and not 0.0 < x <= 1.0) or (knob == "delta" and x < 0):
        bound = "in (0, 1]" if knob == "ratio" else "0 or more"
        raise BadInputError(f"sweep {knob}: values must be {bound}, got {v!r}", parameters="sweep")
    return x


def resolve_conditions(names: Iterable[str] | str | None, main: str,
                       sweep: Iterable[str] | dict[str, Iterable[float]] | None = None) -> list[str]:
    """Requested condition names (a list or a comma list; default `default_names(main)`), checked,
    deduplicated, in report order: the defaults' order, then the rest as asked; each swept value follows
    the condition it varies."""
    if main not in POLICIES:
        raise BadInputError(f"policy must be one of {', '.join(POLICIES)}, got {main!r}", parameters="policy")
    if isinstance(names, str):
        names = names.split(",")
    asked = default_names(main) if names is None else [n.strip() for n in names if n.strip()]
    if not asked:
        raise BadInputError("conditions: no condition given (e.g. zero-shot,full-context,emloc-int8)", parameters="conditions")
    conditions = {n: make_condition(n, main) for n in asked}  # raises on an unknown name
    order = {n: i for i, n in enumerate(default_names(main))}
    asked = sorted(dict.fromkeys(asked), key=lambda n: (order.get(n, len(order)), asked.index(n)))
    swept = parse_sweep(sweep)
    out: list[str] = []
    for name in asked:
        out.append(name)
        c = conditions[name]
        policy = getattr(c, "policy", None)
        if policy is None or c.value is not None:  # zero-shot, full-context, or already at a fixed setting
            continue
        knob = policy_knob(policy)
        out += [f"{name}@{knob}={v:g}" for v in swept.get(knob, ())]
    for knob in swept:
        if not any(n.partition("@")[2].startswith(f"{knob}=") for n in out):
            raise BadInputError(f"sweep {knob}: no asked condition's policy takes {knob} "
                                f"(add one to conditions, e.g. uniform-int8 for ratio, emloc-int8 for delta)", parameters="sweep")
    return list(dict.fromkeys(out))
