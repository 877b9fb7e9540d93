"""Evaluation stage: how well the model answers held-out items with each kind of context.

Needs the [compile] extra (torch, transformers; matplotlib for plots). `evaluate` is the API that
`emloc-edge eval` is a thin layer over.
"""
from .conditions import CONDITIONS, CONDITION_NAMES
from .report import ConditionResult, EvalReport
from .run import evaluate

__all__ = ["CONDITIONS", "CONDITION_NAMES", "ConditionResult", "EvalReport", "evaluate"]
