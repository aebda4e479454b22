"""Linear layers for float32 inference on a CPU: MKL for one-row passes, oneDNN's packed weights
for larger ones.

Why (measured on the embedded model, a forward's 29 matmuls, docs/PERFORMANCE.md "Faster CPU
matmuls"): `nn.Linear` stores its weight [out, in] row-major, which hands the BLAS a transposed
operand. Stored column-major (the transpose of a contiguous [in, out] tensor; same values and
shape) the one-row matrix-vector products of a lone AR step run 25-55% faster (equal up to float
rounding: the sums are taken in another order).
For passes of several rows (batched decode, drafts, verifies, prefill) oneDNN's blocked weight
layout is faster still: 30-50% less time than the column-major MKL path at 8-32 rows, one or two
threads; at one row it was slower (+10%), hence both.

Contract: `prepare_cpu_linears(model, packed=True)` replaces every `nn.Linear` of an inference
model in place by a `CpuLinear` with the same weight values (its `weight` keeps the shape and
name) and returns how many it replaced; a head tied to the embedding is left as it is. With
`packed` (and oneDNN in this torch build) each layer also keeps a oneDNN-packed copy of its weight,
so the linear weights take twice their memory; `packed=False` keeps one column-major copy. An
in-place edit of `weight` (tests boost a logit) is seen by both paths: the packed copy is
remade when the weight's version counter moved. Both paths'
results differ from `nn.Linear`'s in the last bits only (greedy ids were unchanged on the
held-out prompts, and vLLM's still equal ours; tests/engine/test_cpu_linear.py).
Non-goals: training (no autograd through the packed op; weights not contiguous), other dtypes
(bfloat16's one-row product ran slower column-major), CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 32  # the batch size oneDNN's weight layout is chosen for (any row count works)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear, packed: bool) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("CpuLinear: NLD's linear layers have no bias")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=False)  # [out, in] view of [in, out]
        self.packed: torch.Tensor | None = None
        self._packed_version = -1  # the weight's version the packed copy was made from
        if packed:
            self.pack()

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), PACK_ROWS)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.packed is None or x.numel() == self.in_features:  # one row: MKL's GEMV
            return F.linear(x, self.weight)
        if self.weight._version != self._packed_version:  # the weight was edited in place since
            self.pack()
        return packed_matmul(x, self.packed)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., in] times a oneDNN-packed weight (no bias, no fused activation) -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


def prepare_cpu_linears(model: nn.Module, packed: bool = True) -> int:
    """Replace `model`'s linear layers by `CpuLinear`s (see the module's contract)."""
    tied = model.encoder.embed_tokens.weight.data_ptr()
    packed = packed and onednn_available()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.data_ptr() != tied:
                setattr(parent, name, CpuLinear(child, packed))
                count += 1
    return count
