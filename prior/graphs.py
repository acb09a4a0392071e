"""One denoising step captured as a CUDA graph, replayed at every step.

On a GPU a step of this network is a few hundred tiny kernels (3 tokens per row), so
launching them costs more than running them. With static shapes (the condition padded to
the full 78-position prefix, one graph per row count) the whole step is captured once and
replayed with one launch. Graphs are kept across calls; `Prior.warmup` captures the common
sizes in setup() so the first request is fast.

If capture fails (an unusual driver, a debugging tool), the step runs eagerly instead and
says so once on stderr: slower, same numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .model import Condition, PriorNetwork


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    cond: Condition  # static input buffers
    x: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor  # static output buffer


class GraphedDenoiser:
    """Callable like PriorNetwork.denoise(cond, x_t, t), replaying a CUDA graph per row count."""

    def __init__(self, network: PriorNetwork):
        self.network = network
        self.graphs: dict[int, _Captured] = {}
        self.failed = False

    def __call__(self, cond: Condition, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.network.denoise(cond, x, t)
        cond = cond.padded(self.network.cfg.prefix_len)  # static shapes: every condition as long as the longest
        captured = self.graphs.get(x.shape[0])
        if captured is None:
            try:
                captured = self.graphs[x.shape[0]] = self._capture(cond, x, t)
            except RuntimeError as e:
                self.failed = True
                print(f"conditioned-prior: CUDA graph capture failed, running eagerly ({e})", file=sys.stderr)
                return self.network.denoise(cond, x, t)
        captured.cond.keys.copy_(cond.keys)
        captured.cond.values.copy_(cond.values)
        captured.cond.step_bias.copy_(cond.step_bias)
        captured.x.copy_(x)
        captured.t.copy_(t)
        captured.graph.replay()
        return captured.out.clone()  # the buffer is overwritten by the next replay

    def _capture(self, cond: Condition, x: torch.Tensor, t: torch.Tensor) -> _Captured:
        static_cond = Condition(cond.keys.clone(), cond.values.clone(), cond.step_bias.clone())
        static_x, static_t = x.clone(), t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up kernels and the allocator off the main stream
            for _ in range(2):
                self.network.denoise(static_cond, static_x, static_t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.network.denoise(static_cond, static_x, static_t)
        return _Captured(graph, static_cond, static_x, static_t, out)
