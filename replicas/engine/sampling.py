"""Token selection: logit processing (mask ban, temperature, top-k, top-p), greedy and seeded
sampling, and speculative rejection sampling for self-speculation.

Contract: all functions take float32 logits [N, V] of ONE request and that request's
`torch.Generator`, so a request's draws depend only on its own seed and step sequence.
The mask token's logit is always set to -inf: it can never be chosen.
Non-goals: repetition penalties, logit bias.
"""

from __future__ import annotations

import torch

from .params import DecodeParams


def ban_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    out = logits.clone()
    out[..., mask_id] = float("-inf")
    return out


def probabilities(logits: torch.Tensor, params: DecodeParams, mask_id: int) -> torch.Tensor:
    """logits [N, V] -> the sampling distribution [N, V] that temperature/top-k/top-p define."""
    x = ban_mask(logits, mask_id) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = sorted_x.softmax(-1)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set reaching top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return x.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [N, V] -> one sample per row [N]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_token(logits: torch.Tensor, mask_id: int) -> int:
    """The argmax of logits [V] (or [1, V]) with the mask token banned, without building the
    distribution (one argmax; a copy only when the mask token leads). Greedy `select` takes the
    argmax of the softmax: the same token, unless rounding makes two probabilities equal; this
    one, like self-speculation's verification, compares the logits themselves."""
    tok = int(logits.argmax())
    return tok if tok != mask_id else int(ban_mask(logits, mask_id).argmax())


def greedy_tokens(rows: torch.Tensor, mask_id: int) -> list[int]:
    """`greedy_token` of every row of rows [N, V] (rows of DIFFERENT requests: the engine's batch
    of last positions) in ONE argmax and one transfer to the host; `rows` is modified in place
    (its mask column set to -inf), so pass a copy of logits that are used again."""
    rows[:, mask_id] = float("-inf")
    return rows.argmax(-1).tolist()


def select(logits: torch.Tensor, params: DecodeParams, mask_id: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row: (tokens [N], their probability under the distribution [N])."""
    if params.greedy:
        probs = ban_mask(logits, mask_id).softmax(-1)
        tokens = probs.argmax(-1)
    else:
        probs = probabilities(logits, params, mask_id)
        tokens = draw(probs, generator)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def speculative_accept(
    drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator
) -> tuple[int, int]:
    """Speculative rejection sampling (Leviathan et al. / Chen et al.).

    drafts [K] were drawn from q [K, V]; p [K + 1, V] are the target distributions, p[i]
    for the position of drafts[i] and p[K] for the bonus position. Returns (accepted count c,
    the extra token): drafts[:c] are kept and the extra token is drawn from the normalised
    residual max(0, p[c] - q[c]) on a rejection, or from p[K] when all K are accepted. The
    emitted tokens are distributed exactly as sampling from p one token at a time.
    """
    k = drafts.shape[0]
    u = torch.rand(k, generator=generator, device=p.device)  # [K], drawn every cycle
    idx = torch.arange(k, device=p.device)
    ratio = p[idx, drafts] / q[idx, drafts]  # [K]
    rejected = (u > ratio).nonzero()
    if rejected.numel() == 0:
        return k, int(draw(p[k : k + 1], generator))
    c = int(rejected[0])
    residual = (p[c] - q[c]).clamp_min(0)
    total = residual.sum()
    residual = residual / total if total > 0 else p[c]
    return c, int(draw(residual[None], generator))
