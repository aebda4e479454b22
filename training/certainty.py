"""Loss terms of phase 5 (`distill_tiny --self-mode diffusion --certainty C --anchor A`): make
the denoiser confident where it is already right, without moving the AR head.

- `certainty_entropy`: certainty forcing (after dParallel, arXiv 2509.26488). On the model's own
  diffusion trajectories, the mean entropy of the masked predictions whose argmax already is the
  trajectory's token. Minimising it sharpens those predictions, so more positions pass the
  diffusion threshold in one denoising pass; wrong predictions are left to the cross-entropy.
- `anchor_kl`: KL(teacher || model) of the next-token distributions of the clean (causal) half,
  the teacher being the checkpoint as phase 5 found it. The backbone is shared by all modes, so
  sharpening the denoiser also sharpens the AR head, and its greedy text loops more; the anchor
  keeps the AR distributions, hence AR's greedy output and self-speculation's verifier, where
  they were.

Contract: both take logits and return a scalar tensor that can be back-propagated. Non-goals:
the noising and the attention layout (`training.train_tiny`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def certainty_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the predictions logits [M, V] whose argmax is targets [M]; a zero
    that keeps the graph when none is."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [M, V]
    right = logp.argmax(dim=-1) == targets  # [M]
    if not bool(right.any()):
        return logits.sum() * 0.0
    ent = -(logp[right].exp() * logp[right]).sum(dim=-1)  # [R]
    return ent.mean()


def anchor_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(teacher) || softmax(model)) for logits [..., V] of the
    same shape; the teacher's side carries no gradient."""
    v = logits.shape[-1]
    logp = F.log_softmax(logits.float().reshape(-1, v), dim=-1)  # [N, V]
    logq = F.log_softmax(teacher_logits.detach().float().reshape(-1, v), dim=-1)  # [N, V]
    return F.kl_div(logp, logq, log_target=True, reduction="batchmean")
