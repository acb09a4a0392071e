"""Weights prepacked for oneDNN on the CPU (prior/packed.py).

The packed network is the default CPU path, so test_parity.py and test_full_size.py compare
it with the original. Here: it replaces every linear layer without keeping a second copy,
gives what plain nn.Linear gives, and steps aside where packing does not work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prior.packed
from prior import load
from prior.packed import PackedLinear, pack_linears
from tests.compare import relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_load_packs_every_linear_and_keeps_no_copy(tiny_checkpoint):
    plain = load(tiny_checkpoint, device="cpu", dtype="float32", packed_weights=False)
    packed = load(tiny_checkpoint, device="cpu", dtype="float32")
    assert packed.packed and not plain.packed
    linears = [name for name, m in plain.network.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5 * plain.config.depth + 1  # q, kv, out, ff in, ff out per layer; the output projection
    modules = dict(packed.network.named_modules())
    assert all(isinstance(modules[name], PackedLinear) for name in linears)
    assert not any(isinstance(m, nn.Linear) for m in packed.network.modules())
    # The file stores float16: packed weights and everything left unpacked are float32 now.
    assert all(modules[name].packed_weight.dtype == torch.float32 for name in linears)
    assert {t.dtype for t in packed.network.state_dict().values() if t.is_floating_point()} == {torch.float32}
    # The linear weights live only in their packed form: no parameter or buffer still holds them.
    linear_weights = {f"{name}.weight" for name in linears}
    assert set(plain.network.state_dict()) - set(packed.network.state_dict()) == linear_weights


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_packed_gives_what_nn_linear_gives(tiny_checkpoint, dtype, tolerance, cond_scale):
    kwargs = dict(candidates=3, cond_scale=cond_scale, steps=10, seed=7)
    prompts = ["a red cube on a table", "5!$ a lighthouse"]
    packed = load(tiny_checkpoint, device="cpu", dtype=dtype).embed(prompts, **kwargs)
    plain = load(tiny_checkpoint, device="cpu", dtype=dtype, packed_weights=False).embed(prompts, **kwargs)
    assert relative_error(packed.candidates, plain.candidates) < tolerance
    if dtype == "float32":
        assert np.array_equal(packed.chosen, plain.chosen)


def test_packed_linear_with_bias_and_any_row_count():
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    packed = PackedLinear(linear, rows=6)
    for shape in [(1, 48), (6, 48), (2, 3, 48), (5, 77, 48)]:
        x = torch.randn(shape)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


class _WrongOutput(PackedLinear):
    def forward(self, x):
        return super().forward(x) * 1.01


class _NoOp(PackedLinear):
    def __init__(self, linear, rows, dtype=None):
        raise RuntimeError("no oneDNN kernel for this CPU")


@pytest.mark.parametrize("broken", [_WrongOutput, _NoOp])
def test_falls_back_to_nn_linear_when_packing_does_not_work(tiny_checkpoint, monkeypatch, broken):
    expected = load(tiny_checkpoint, device="cpu", dtype="float32", packed_weights=False)
    monkeypatch.setattr(prior.packed, "PackedLinear", broken)
    model = load(tiny_checkpoint, device="cpu", dtype="float32")
    assert model.packed is False
    assert not any(isinstance(m, PackedLinear) for m in model.network.modules())
    kwargs = dict(candidates=2, steps=4, seed=1)
    assert np.array_equal(model.embed("a cat", **kwargs).candidates, expected.embed("a cat", **kwargs).candidates)


def test_float16_and_non_cpu_are_left_alone():
    half = nn.Sequential(nn.Linear(8, 8).half())
    assert pack_linears(half, rows=6) is False and isinstance(half[0], nn.Linear)
    assert pack_linears(half, rows=6, dtype=torch.float16) is False and isinstance(half[0], nn.Linear)
    meta = nn.Sequential(nn.Linear(8, 8, device="meta"))
    assert pack_linears(meta, rows=6, dtype=torch.float32) is False and isinstance(meta[0], nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_converts_each_layer_to_the_dtype_asked(dtype):
    """As load() does on a CPU: the network is built in the file's float16 and each linear
    weight is converted as it is packed."""
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(32, 48).half(), nn.Linear(48, 16, bias=False).half())
    expected = [nn.Linear(32, 48).to(dtype), nn.Linear(48, 16, bias=False).to(dtype)]
    for target, layer in zip(expected, half, strict=True):
        target.load_state_dict(layer.state_dict())  # the float16 values, in `dtype`
    assert pack_linears(half, rows=6, dtype=dtype) is True
    x = torch.randn(6, 32).to(dtype)
    out = half(x)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected[1](expected[0](x)), rtol=tolerance, atol=tolerance)
