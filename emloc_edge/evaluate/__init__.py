"""Evaluation stage: how well the model answers held-out items with each kind of context.

Needs the [compile] extra (torch, transformers; matplotlib for plots). `evaluate` is the API that
`emloc-edge eval` is a thin layer over. Queries are answered by the exported model under ONNX Runtime
(backend "ort", the deployed path) or by the PyTorch reference (backend "torch").
"""
from .backends import BACKENDS
from .conditions import default_names, make_condition
from .names import resolve_conditions
from .report import ConditionResult, EvalReport
from .run import evaluate

__all__ = ["BACKENDS", "ConditionResult", "EvalReport", "default_names", "evaluate", "make_condition",
           "resolve_conditions"]
