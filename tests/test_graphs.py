"""prior/graphs.py's bookkeeping, on the CPU, with a stand-in for CUDA graphs.

A CUDA graph replays the kernels it recorded: it reads the *static input buffers* it was
captured with and overwrites the *same output buffer*. The stand-in below keeps exactly that
contract (replay recomputes from the captured tensors and writes into the captured output),
so these tests catch what GraphedDenoiser must get right on a GPU: copying each call's
inputs into the buffers, padding conditions to the static length, one graph per row count,
not handing out a buffer the next replay overwrites, and falling back to eager on failure.
A meta-device run checks that the step holds no host sync (which capture refuses). What they
cannot catch is a kernel that refuses capture for its own reasons; bench/gpu.sh runs the real thing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import prior.graphs
from prior.graphs import GraphedDenoiser
from prior.pipeline import load


class StandInGraph:
    """Records the one network call made while capturing; replay() reruns it on the tensors it
    was given then (the static buffers) and writes into the output tensor it returned then."""

    captures = 0
    replays = 0

    def __init__(self):
        self.rerun = None
        self.out = None

    def replay(self):
        StandInGraph.replays += 1
        self.out.copy_(self.rerun())


class StandInStream:
    def wait_stream(self, other):
        pass


def _stand_in_streams(monkeypatch) -> None:
    cuda = prior.graphs.torch.cuda
    monkeypatch.setattr(cuda, "Stream", StandInStream)
    monkeypatch.setattr(cuda, "current_stream", StandInStream)
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """torch.cuda's graph API replaced by StandInGraph; yields a function that wraps a
    network's denoise so that calls made while capturing are recorded."""
    capturing: list[StandInGraph] = []

    @contextlib.contextmanager
    def graph(g):
        StandInGraph.captures += 1
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()

    _stand_in_streams(monkeypatch)
    monkeypatch.setattr(prior.graphs.torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(prior.graphs.torch.cuda, "graph", graph)
    StandInGraph.captures = StandInGraph.replays = 0

    def record_captures(network):
        eager = network.denoise

        def denoise(cond, x, t):
            out = eager(cond, x, t)
            if capturing:
                capturing[-1].rerun, capturing[-1].out = (lambda: eager(cond, x, t)), out
            return out

        network.denoise = denoise
        return eager

    return record_captures


@pytest.fixture
def model(tiny_checkpoint):
    return load(tiny_checkpoint, device="cpu", dtype="float32")


def _condition(model, prompts, keep=True):
    tokens, _ = model.tokenizer(prompts)
    text = model.text.encode(tokens)
    return model.network.encode_condition(text.states, text.embed, text.mask,
                                          torch.full((len(prompts),), keep, dtype=torch.bool))


def test_replays_give_eager_results_for_new_inputs(model, stand_in_cuda):
    eager = stand_in_cuda(model.network)
    graphed = GraphedDenoiser(model.network)
    short, long = _condition(model, ["a cat", "a dog"]), _condition(model, ["a much longer prompt about a lighthouse"] * 2)
    calls = [(short, torch.randn(2, model.config.dim), torch.tensor([999, 998])),
             (long, torch.randn(2, model.config.dim), torch.tensor([500, 1])),
             (short, torch.randn(2, model.config.dim), torch.tensor([0, 0]))]
    outputs = [graphed(cond, x, t) for cond, x, t in calls]
    assert StandInGraph.captures == 1 and StandInGraph.replays == 3  # one graph for 2 rows, replayed every call
    for (cond, x, t), out in zip(calls, outputs, strict=True):  # earlier outputs were not overwritten
        torch.testing.assert_close(out, eager(cond, x, t), rtol=1e-5, atol=1e-6)


def test_one_graph_per_row_count(model, stand_in_cuda):
    eager = stand_in_cuda(model.network)
    graphed = GraphedDenoiser(model.network)
    for rows in (2, 4, 2, 4):
        cond = _condition(model, ["a red cube"] * rows)
        x, t = torch.randn(rows, model.config.dim), torch.full((rows,), 7)
        torch.testing.assert_close(graphed(cond, x, t), eager(cond, x, t), rtol=1e-5, atol=1e-6)
    assert sorted(graphed.graphs) == [2, 4] and StandInGraph.captures == 2


@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_embed_through_graphs_equals_eager(model, stand_in_cuda, cond_scale):
    """The whole sampler, guidance and its three conditions included, through the graphed step."""
    expected = model.embed(["a red cube", "a lighthouse at dusk"], candidates=3, cond_scale=cond_scale, steps=8, seed=5)
    stand_in_cuda(model.network)
    model._denoise_step = GraphedDenoiser(model.network)
    result = model.embed(["a red cube", "a lighthouse at dusk"], candidates=3, cond_scale=cond_scale, steps=8, seed=5)
    np.testing.assert_allclose(result.candidates, expected.candidates, rtol=1e-5, atol=1e-6)
    assert StandInGraph.replays == 8


def test_a_failed_capture_runs_eagerly_and_says_so_once(model, monkeypatch, capsys):
    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    _stand_in_streams(monkeypatch)
    monkeypatch.setattr(prior.graphs.torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(prior.graphs.torch.cuda, "graph", refuse)
    graphed = GraphedDenoiser(model.network)
    cond, t = _condition(model, ["a cat"]), torch.tensor([3])
    for _ in range(2):
        x = torch.randn(1, model.config.dim)
        torch.testing.assert_close(graphed(cond, x, t), model.network.denoise(cond, x, t))
    assert graphed.failed
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture failed, running eagerly") == 1


@pytest.mark.parametrize("rows", [2, 8])
def test_the_captured_step_needs_no_data_on_the_host(rows):
    """A CUDA graph cannot hold a host sync (`.item()`, `nonzero`, a shape taken from values, a
    CPU->GPU copy): capture fails there. A meta tensor has no data at all, so a step that runs on
    the meta device, full-size and padded as GraphedDenoiser pads it, has none of those."""
    from prior.model import PREFIX_LEN, STEP_LEN, Condition, PriorConfig, PriorNetwork

    cfg = PriorConfig()
    with torch.device("meta"):
        network = PriorNetwork(cfg).half()
        keys = torch.empty(cfg.depth, rows, 1 + PREFIX_LEN, cfg.dim_head, dtype=torch.half)
        bias = torch.empty(rows, cfg.heads, STEP_LEN, 1 + PREFIX_LEN + STEP_LEN, dtype=torch.half)
        x = torch.empty(rows, cfg.dim, dtype=torch.half)
        t = torch.empty(rows, dtype=torch.long)
        out = network.denoise(Condition(keys, keys.clone(), bias), x, t)
    assert out.device.type == "meta" and out.shape == (rows, cfg.dim) and out.dtype == torch.half
