"""Relative comparisons shared by the tests: the error is measured against the largest
magnitude of the expected value, so one tolerance fits tensors of any scale."""

from __future__ import annotations

import numpy as np
import torch


def _float64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = _float64(actual), _float64(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_close_relative(actual, expected, tol: float = 1e-4, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected|, shapes equal."""
    actual, expected = _float64(actual), _float64(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert scale > 0
    assert error <= tol * scale, f"{what}: max |diff| {error:.3g} > {tol} * max |expected| {scale:.3g}"


def assert_text_features_match(ours, tokens: torch.Tensor, raw, states, mask) -> int:
    """Our TextFeatures against the oracle's (raw, 77 states, mask): the tower stops at the
    batch's last end token, and the oracle's mask attends nothing after it. Returns that length n."""
    n = int(tokens.argmax(dim=-1).max()) + 1
    assert ours.states.shape[1] == n and not mask[:, n:].any()
    assert_close_relative(ours.raw, raw)
    assert_close_relative(ours.states, states[:, :n])
    assert torch.equal(ours.mask, mask[:, :n])
    return n
