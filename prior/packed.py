"""On a CPU, the prior network's matmuls run on weights prepacked for oneDNN.

A sampling step multiplies a few rows (3 tokens per candidate) by every weight of the
network: about 1 GB in float32, read once per step. For such skinny products ATen's default
CPU matmul streams the weights at about 10 GB/s on our 2-core development machine; oneDNN,
with each weight reordered once into its own blocked layout, reaches about 35 GB/s. Same
arithmetic, rounding differs by ~1e-6 relative: a full-size float32 step at batch 2 takes
47 ms instead of 120 ms (bench/cpu.py, which times both against the original), a bfloat16
one about 1.6x less than unpacked.

The reorder costs about 0.5 s for the full-size network in float32 (more on a busy
machine: it writes 1 GB of fresh memory), paid once in `load()`.
The packed weights replace the `nn.Linear` modules (no second copy is kept); a packed
network runs only on the CPU, and only for inference.

`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise` are the ops that
torch.compile itself emits for packed CPU linears. Where they are missing or disagree with
`F.linear` on a probe (another build, another CPU), nothing is packed and the network runs
as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held in oneDNN's blocked layout, reordered for `rows` input rows.
    `dtype` (default: the layer's own) is the precision it computes in."""

    def __init__(self, linear: nn.Linear, rows: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = dtype or linear.weight.dtype
        # Plain attributes, not buffers: an opaque oneDNN tensor must not be moved by .to() or saved.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module, rows: int, dtype: torch.dtype | None = None) -> bool:
    """Replace every nn.Linear inside `module` (on the CPU) by a PackedLinear, in place.

    `rows` is the usual number of input rows, the hint oneDNN picks its layout for; any other
    count still gives correct results. `dtype` converts each weight as it is packed, so a
    module loaded in the file's float16 needs no whole float32 copy first (default: keep the
    layers' own). Returns False, leaving `module` untouched, where this build or CPU cannot
    pack (see the module docstring).
    """
    places = [(parent, name) for parent in module.modules()
              for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not places or not _packing_works(getattr(*places[0]), rows, dtype):
        return False
    for parent, name in places:  # one layer at a time: its plain weight is freed once its packed copy exists
        setattr(parent, name, PackedLinear(getattr(parent, name), rows, dtype))
    return True


def _packing_works(linear: nn.Linear, rows: int, dtype: torch.dtype | None) -> bool:
    """Pack one layer and compare it with F.linear on random rows."""
    dtype = dtype or linear.weight.dtype
    if linear.weight.device.type != "cpu" or dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
            packed = PackedLinear(linear, rows, dtype)(x).float()
            bias = None if linear.bias is None else linear.bias.to(dtype)
            plain = F.linear(x, linear.weight.to(dtype), bias).float()
    except (RuntimeError, AttributeError, NotImplementedError):  # op missing, or not for this CPU
        return False
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    return packed.shape == plain.shape and bool((packed - plain).abs().max() <= tolerance * plain.abs().max())
