"""Token importance from answer-token attention, and selection of the tokens a layer keeps."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .policy import FORCES


def smooth_scores(mass: torch.Tensor, answer: torch.Tensor, width: int = 5) -> torch.Tensor:
    """EMLoC importance of each chunk token per KV head.

    mass [kv, L]: attention mass each token received from the calibration answer tokens (summed over
    rows, queries and the query heads of the group). Smoothed by a zero-padded average of `width`
    neighbours, so spans survive together. Answer tokens get +inf: the reference added 100, which a
    heavily attended token (a sink) can exceed once many answer queries are summed.
    answer [L] bool.
    """
    smoothed = F.avg_pool1d(mass[:, None], width, stride=1, padding=width // 2, count_include_pad=True)[:, 0]  # [kv, L]
    return smoothed.masked_fill(answer[None], float("inf"))


def keep_count(ratio: float, tokens: int, answers: int) -> int:
    """Tokens a layer keeps at `ratio`: floor(ratio·L), but never fewer than the answer tokens."""
    return min(tokens, max(int(ratio * tokens), answers))


def keep_topk(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [kv, n] of the n best-scored tokens per KV head, in context order."""
    top = scores.topk(n, dim=-1).indices  # [kv, n], by descending score
    return top.sort(dim=-1).values


def keep_topk_per_segment(scores: torch.Tensor, segment: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    """Indices [kv, sum(quotas)] of the quotas[s] best-scored tokens of each segment s, per KV head, in
    context order. scores [kv, L]; segment [L] long, the segment of each token (0 .. len(quotas)-1)."""
    parts = []
    for s, quota in enumerate(quotas):
        where = (segment == s).nonzero()[:, 0]  # [L_s] the segment's tokens
        parts.append(where[scores[:, where].topk(quota, dim=-1).indices])  # [kv, quota]
    return torch.cat(parts, -1).sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [kv, L, hd] at per-head token indices [kv, n] -> [kv, n, hd]"""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def merge_evicted_values(key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, mass: torch.Tensor,
                         threshold: float, origin: torch.Tensor | None = None) -> torch.Tensor:
    """Values [kv, n, hd] of the kept tokens index [kv, n], each evicted token's value folded into the
    kept token of its head whose key is most like its own (cosine >= threshold), weighted by attention mass
    (D2O/CaM-style merging; the keys stay as computed, so the memory is still plain past-key-values).

    key, value [kv, L, hd] (keys rotated at their positions); mass [kv, L] >= 0 the attention each token
    received; origin [L] (optional): the demonstration of each token, and a token merges only into one of
    its own demonstration's (a calibration row blind to its own demonstration must not read it through
    another's token). A kept token j becomes (m_j v_j + sum_e m_e v_e) / (m_j + sum_e m_e) over the evicted
    e whose nearest eligible kept key is j's. threshold > 1 merges nothing. Computed in float32 (summed
    attention mass overflows fp16), returned in value's dtype.
    """
    kv, tokens, hd = value.shape
    value32, mass32 = value.float(), mass.float()
    kept = torch.zeros(kv, tokens, dtype=torch.bool, device=key.device).scatter(1, index, True)  # [kv, L]
    unit = F.normalize(key.float(), dim=-1)  # [kv, L, hd]
    similarity = unit @ gather_tokens(unit, index).transpose(1, 2)  # [kv, L, n] each token to each kept one
    if origin is not None:
        same = origin[None, :, None] == origin[index][:, None, :]  # [kv, L, n]
        similarity = similarity.masked_fill(~same, -math.inf)
    best, target = similarity.max(-1)  # [kv, L] over the eligible kept tokens
    weight = mass32 * (~kept & (best >= threshold))  # [kv, L]: what each evicted token brings; 0 for the rest
    kept_mass, kept_value = mass32.gather(1, index), gather_tokens(value32, index)  # [kv, n], [kv, n, hd]
    total = (kept_mass[..., None] * kept_value).scatter_add(
        1, target[..., None].expand(-1, -1, hd), weight[..., None] * value32)  # [kv, n, hd]
    norm = kept_mass.scatter_add(1, target, weight)  # [kv, n]
    merged = norm > kept_mass  # [kv, n] something merged in (so norm > 0 there)
    out = torch.where(merged[..., None], total / torch.where(merged, norm, 1.0)[..., None], kept_value)
    return out.to(value.dtype)


def content_tokens(answer: torch.Tensor) -> torch.Tensor:
    """The answer span [L] bool without each span's first and last token (the newline that opens the
    assistant turn and its end-of-turn), which carry the turn's structure rather than the answer."""
    return answer & _shifted(answer, 1) & _shifted(answer, -1)


def answer_and_end_tokens(answer: torch.Tensor) -> torch.Tensor:
    """The answer span [L] bool without its opening newline: the answer's tokens and its end-of-turn."""
    return answer & _shifted(answer, 1)


def _shifted(mask: torch.Tensor, by: int) -> torch.Tensor:
    """mask [L] moved `by` places right (negative: left), False where it moved in from outside."""
    pad = mask.new_zeros(abs(by))
    return torch.cat([pad, mask[:-by]]) if by > 0 else torch.cat([mask[-by:], pad])


def answer_span_tokens(answer: torch.Tensor) -> torch.Tensor:
    """The whole answer span [L] bool: opening newline, the answer, end-of-turn (the paper's choice)."""
    return answer


# policy.forces -> the tokens every layer keeps, from the chunk's answer-span mask
FORCED_TOKENS = dict(zip(FORCES, (answer_span_tokens, answer_and_end_tokens, content_tokens)))  # names: policy.FORCES

# policy.scores_from -> the calibration tokens [B, T] bool whose attention scores a chunk's tokens: the
# answers' (the paper's), or every token's (the image and question tokens attend to the demonstrations
# that resemble them, as a new item's would)
SCORING_TOKENS = {"answer": lambda calib: calib.answer_mask, "all": lambda calib: calib.attention_mask}

# policy.score_weight -> function(value [kv, L, hd]) -> [kv, L] weight multiplying a token's attention mass:
# none, or the norm of its value (what the token adds to an output is its attention times its value)
TOKEN_WEIGHTS = {"attention": lambda value: value.new_ones(value.shape[:2]),
                 "value-norm": lambda value: value.float().norm(dim=-1)}
