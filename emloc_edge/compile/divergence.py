"""Jensen-Shannon divergence between the pruned (student) and unpruned (teacher) output distributions."""
from __future__ import annotations

import math

import torch


def js_divergence(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> float:
    """Mean JS divergence in nats over positions; student_logits [N, V], teacher_logprobs [N, V].

    Computed in fp32 from log-probabilities: the reference took softmax in bf16, where a probability
    that underflows to 0 gives 0·(−∞) = NaN and silently rejects the candidate.
    """
    log_p = student_logits.float().log_softmax(-1)  # [N, V]
    log_q = teacher_logprobs.float()  # [N, V]
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # log ½(P+Q), no underflow
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)  # [N]
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)  # [N]
    js = 0.5 * (kl_pm + kl_qm)
    if not torch.isfinite(js).all():
        raise FloatingPointError("JS divergence is not finite: the model produced non-finite logits")
    return float(js.mean())
