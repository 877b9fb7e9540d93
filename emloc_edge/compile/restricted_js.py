"""JS divergence of a candidate from the teacher on a restricted vocabulary, with a certified bracket.

The LM head over the whole vocabulary (V ≈ 49k-152k) is most of the cost of a top-layer trial, yet at
the answer positions the teacher's mass sits on a few tokens. Let S be the union over positions of the
teacher's top tokens that cover ≥ 1 − ε of its probability, and T the rest (the tail). For a student
(candidate) at normed hidden x_s and the teacher at x_t, the head is evaluated on S only:

    z_S = W_S x_s                          exact student logits on S              [N, |S|]
    t   = logsumexp_{v∈T} w_v·x_s          the student's tail, NOT computed; bracketed:
        t ≥ t_T + μ_T·Δ                    (convexity of logsumexp; μ_T = teacher-tail mean of w_v)
        t ≤ t_T + min(‖Δ‖·max_T‖w_v‖, μ_T·Δ + ½‖Δ‖²·max_v‖w_v − c‖²)   (Hessian = a covariance)
    with t_T the teacher's own tail logsumexp and Δ = x_s − x_t.

The student's tail mass a = e^t / (e^t + Σ_S e^z) is then known to an interval [a_lo, a_hi]. With
P̃(a) = ((1−a)·softmax(z_S), a) and Q̃ = (q_S, q_T) the distributions coarse-grained to S ∪ {tail}:

    min_a JS(P̃(a), Q̃)  ≤  JS(P, Q)  ≤  max_a JS(P̃(a), Q̃) + ½(a + q_T)·ln 2

(left: merging outcomes never increases an f-divergence; right: each tail term of JS is at most
½(p_v + q_v)·ln 2). P̃ is linear in a and JS is convex, so the max sits at an endpoint and the min is
found by ternary search. A trial whose bracket lies on one side of δ is decided without the full head;
one that straddles δ is measured exactly, so decisions equal the full-vocabulary ones.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


def _js_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-outcome JS contributions j(p, q) = ½p·ln(2p/(p+q)) + ½q·ln(2q/(p+q)), elementwise."""
    log_m = torch.logaddexp(log_p, log_q) - LN2
    p, q = log_p.exp(), log_q.exp()
    zero = log_p.new_zeros(())
    # 0·log 0 = 0: an outcome with no mass on one side contributes nothing on that side
    return 0.5 * (torch.where(p > 0, p * (log_p - log_m), zero) + torch.where(q > 0, q * (log_q - log_m), zero))


def full_js(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact JS per position [N] (student logits [N, V], teacher log-probs [N, V])."""
    return _js_terms(student_logits.float().log_softmax(-1), teacher_logprobs.float()).sum(-1)


@dataclass
class Bracket:
    lo: float  # certified lower bound on the mean JS over positions
    hi: float  # certified upper bound


class RestrictedHead:
    """The teacher at the answer positions, with what is needed to bracket a candidate's JS cheaply."""

    def __init__(self, weight: torch.Tensor, teacher_x: torch.Tensor, eps: float = 1e-4, per_position: int = 1024,
                 max_share: float = 0.25):
        """weight [V, D] the LM head (no bias); teacher_x [N, D] the normed teacher hidden states.

        Each position contributes its top tokens up to 1 - eps of its mass, at most `per_position` of
        them (a flat position leaves more in its tail bucket; the bounds still hold). The head is
        disabled (every trial measured on the whole vocabulary) when S would exceed max_share of V.
        """
        weight, teacher_x = weight.detach(), teacher_x.detach()
        self.weight = weight
        self.x_t = teacher_x.float()  # [N, D]
        z = self.x_t @ weight.float().T  # [N, V]
        self.log_q = z.log_softmax(-1)  # [N, V] full teacher, for exact measurements
        order = self.log_q.argsort(-1, descending=True)  # [N, V]
        cum = self.log_q.gather(-1, order).exp().cumsum(-1)  # [N, V]
        need = ((cum < 1.0 - eps).sum(-1) + 1).clamp(max=per_position)  # tokens covering 1 - eps, capped
        picked = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
        for i, n in enumerate(need.tolist()):
            picked[order[i, :n]] = True
        self.enabled = bool(picked.sum() <= max_share * z.shape[-1])
        self.vocab = picked.nonzero()[:, 0]  # [S]
        tail = ~picked
        self.w_s = weight.float()[self.vocab]  # [S, D]
        self.log_q_s = self.log_q[:, self.vocab]  # [N, S]
        self.log_q_tail = torch.logsumexp(self.log_q[:, tail], -1) if tail.any() else z.new_full((z.shape[0],), -math.inf)
        self.tail_lse = torch.logsumexp(z[:, tail], -1) if tail.any() else z.new_full((z.shape[0],), -math.inf)  # [N]
        w_tail = weight.float()[tail]  # [|T|, D]
        self.tail_mean = (z[:, tail] - self.tail_lse[:, None]).softmax(-1) @ w_tail if tail.any() else torch.zeros_like(self.x_t)
        norms = w_tail.norm(dim=-1) if tail.any() else z.new_zeros(1)
        self.w_tail_max = float(norms.max())
        centre = weight.float().mean(0)
        self.w_spread_sq = float(((w_tail - centre) ** 2).sum(-1).max()) if tail.any() else 0.0

    def at(self, keep: torch.Tensor) -> "RestrictedHead":
        """The same head judged at the positions keep [N] bool only (S stays the union over all positions,
        so the bounds still hold)."""
        view = copy.copy(self)
        for name in ("x_t", "log_q", "log_q_s", "log_q_tail", "tail_lse", "tail_mean"):
            setattr(view, name, getattr(self, name)[keep])
        return view

    def _student(self, x_s: torch.Tensor):
        """Student logits on S normalized within S [N, S], and its tail-mass bounds a_lo ≤ a ≤ a_hi [N]
        (a_lo is the tangent, i.e. first-order, estimate: exact when x_s = x_t)."""
        z_s = x_s @ self.w_s.T  # [N, S]
        lse_s = torch.logsumexp(z_s, -1)  # [N]
        delta = x_s - self.x_t  # [N, D]
        lin = (delta * self.tail_mean).sum(-1)  # [N]
        size = delta.norm(dim=-1)
        t_lo = self.tail_lse + lin
        t_hi = self.tail_lse + torch.minimum(size * self.w_tail_max, lin + 0.5 * size**2 * self.w_spread_sq)
        a_lo = torch.sigmoid(t_lo - lse_s).clamp(1e-30, 1 - 1e-6)
        a_hi = torch.sigmoid(t_hi - lse_s).clamp(1e-30, 1 - 1e-6)
        return z_s - lse_s[:, None], a_lo, a_hi

    def _coarse(self, log_a_inner: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """JS(P̃(a), Q̃) per position [N]."""
        on_s = _js_terms(log_a_inner + torch.log1p(-a)[:, None], self.log_q_s).sum(-1)
        return on_s + _js_terms(torch.log(a), self.log_q_tail)

    def estimate(self, x_s: torch.Tensor) -> float:
        """The restricted-vocabulary JS: JS on S ∪ {tail} at the tangent estimate of the student's tail
        mass. At the true tail mass this is a lower bound of the full JS (merging outcomes); measured on
        SmolLM2 it lies within ~2% below it."""
        log_a_inner, a_lo, _ = self._student(x_s.float())
        return float(self._coarse(log_a_inner, a_lo).mean())

    def bracket(self, x_s: torch.Tensor) -> Bracket:
        """Certified bounds on the mean JS over positions for the student at normed hidden x_s [N, D]."""
        log_a_inner, a_lo, a_hi = self._student(x_s.float())
        coarse = lambda a: self._coarse(log_a_inner, a)  # noqa: E731

        lo_a, hi_a = a_lo.clone(), a_hi.clone()
        for _ in range(12):  # ternary search of a convex function, every position at once
            m1, m2 = lo_a + (hi_a - lo_a) / 3, hi_a - (hi_a - lo_a) / 3
            left = coarse(m1) <= coarse(m2)
            hi_a = torch.where(left, m2, hi_a)
            lo_a = torch.where(left, lo_a, m1)
        low = torch.minimum(coarse(a_lo), coarse(a_hi))
        q_tail = self.log_q_tail.exp()
        high = torch.maximum(coarse(a_lo) + 0.5 * (a_lo + q_tail) * LN2, coarse(a_hi) + 0.5 * (a_hi + q_tail) * LN2)
        # The search ends on an interval [lo_a, hi_a] around the minimiser; convexity bounds f there
        # from below by its tangent at lo_a: f(a) >= f(lo_a) + f'(lo_a)·(a - lo_a) >= f(lo_a) - |f'(lo_a)|·width.
        width = hi_a - lo_a
        slope = self._slope(lo_a, log_a_inner)
        low = torch.minimum(low, coarse(lo_a) - slope.abs() * width).clamp(min=0.0)
        return Bracket(lo=float(low.mean()), hi=float(high.mean()))

    def _slope(self, a: torch.Tensor, log_a_inner: torch.Tensor) -> torch.Tensor:
        """d/da JS(P̃(a), Q̃) per position: ∂j/∂p = ½·ln(2p/(p+q)) through p_v = (1−a)·A_v and p_tail = a."""
        log_p = log_a_inner + torch.log1p(-a)[:, None]  # [N, S]
        d_s = 0.5 * (LN2 + log_p - torch.logaddexp(log_p, self.log_q_s))  # [N, S]
        d_tail = 0.5 * (LN2 + torch.log(a) - torch.logaddexp(torch.log(a), self.log_q_tail))
        return -(log_a_inner.exp() * d_s).sum(-1) + d_tail

    def exact(self, x_s: torch.Tensor) -> float:
        """Full-vocabulary mean JS (the whole head)."""
        js = full_js(x_s.float() @ self.weight.float().T, self.log_q)
        if not torch.isfinite(js).all():
            raise FloatingPointError("JS divergence is not finite: the model produced non-finite logits")
        return float(js.mean())
