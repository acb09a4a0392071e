"""Shared fixtures: random checkpoints in the exact prior_ema_fp16.pth format.

Tiny ones are built per test session; the full-size one (1.35 GB, about a minute to build)
is cached under $PRIOR_TEST_CACHE (default ~/.cache/conditioned-prior-tests) between runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.oracle import FULL, SCHEDULE_SHAPES, TINY, TINY_SHAPES, load_oracle, make_checkpoint

CACHE = Path(os.environ.get("PRIOR_TEST_CACHE", Path.home() / ".cache" / "conditioned-prior-tests"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per tiny shape in tests.oracle.TINY_SHAPES, seeds differ."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(root / f"{name}.pth", shape, seed=i) for i, (name, shape) in enumerate(TINY_SHAPES.items())}


@pytest.fixture(scope="session")
def schedule_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with 37 and 1200 timesteps (tests.oracle.SCHEDULE_SHAPES)."""
    root = tmp_path_factory.mktemp("schedules")
    return {name: make_checkpoint(root / f"{name}.pth", shape, seed=10 + i)
            for i, (name, shape) in enumerate(SCHEDULE_SHAPES.items())}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints) -> Path:
    """The smallest checkpoint (shape tests.oracle.TINY): for tests of behaviour, not of shapes."""
    return tiny_checkpoints["tiny"]


@pytest.fixture(scope="session")
def tiny_oracle(tiny_checkpoint):
    return load_oracle(tiny_checkpoint, TINY)


@pytest.fixture(scope="session")
def full_checkpoint() -> Path:
    """A full-size (ViT-L/14 + 24-layer prior) random checkpoint, built once and cached."""
    path = CACHE / "full-seed0.pth"
    if not path.exists():
        make_checkpoint(path, FULL, seed=0)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are all per-op overhead: one thread is as fast, and far faster when the
    machine is busy (two threads spinning at every barrier on two shared cores crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
