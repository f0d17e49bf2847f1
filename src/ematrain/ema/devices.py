"""Shadows that live on another device than the model: the background averager of host-memory
shadows of a CUDA model, and the swapper that evaluates any shadow inside the live model."""
from __future__ import annotations

import concurrent.futures
from typing import Sequence

import torch
from torch import nn

from ..util.modules import unwrap_model


class HostAverager:
    """Averages a CUDA model into shadows in host memory without stalling the device.

    The model is copied into pinned staging buffers on a side stream that first waits for the
    training stream (so it reads the weights after the optimizer step); the training stream in
    turn waits for the copy before it goes on (a device-side wait: the next optimizer step must
    not change the weights while they are read). A worker thread waits for the copy, then
    averages on the CPU while the next steps run. At most one average is in flight.
    """

    def __init__(self):
        self._stream = None
        self._worker = None
        self._pending = None

    def submit(self, plan, average, weights: list[float]) -> None:
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, "ematrain-ema")
            self._stream = torch.cuda.Stream(plan.sync)
        main = torch.cuda.current_stream(plan.sync)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            plan.read_model()
            copied = torch.cuda.Event()
            copied.record(self._stream)
        main.wait_stream(self._stream)
        self._pending = self._worker.submit(self._run, copied, average, plan, weights)

    @staticmethod
    def _run(copied, average, plan, weights) -> None:
        copied.synchronize()
        average(plan, weights)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


class WeightSwapper:
    """Loads the raw weights or one of several shadows into the live model, one copy per change.

    This is how a shadow that lives elsewhere (``--model-ema-force-cpu``) is evaluated on the
    training device without a second copy of the model there. The raw weights are stashed in
    host memory (pinned for a CUDA model) and `restore` puts them back bit for bit. Only tensor
    values are copied, so the Parameter objects, and the optimizer state keyed on them, stay.

    Sets are numbered 0 (the raw weights) and 1.. (``shadows`` in order).
    """

    def __init__(self, model: nn.Module, shadows: Sequence[nn.Module]):
        source = unwrap_model(model)
        self.live = list(source.parameters()) + list(source.buffers())
        on_cuda = any(t.device.type == "cuda" for t in self.live)
        stash = [t.detach().to("cpu", copy=True) for t in self.live]
        if on_cuda and torch.cuda.is_available():
            stash = [t.pin_memory() for t in stash]
        self.sets = [stash] + [list(m.parameters()) + list(m.buffers()) for m in shadows]
        for tensors in self.sets[1:]:
            if len(tensors) != len(self.live):
                raise ValueError("shadow does not match the model's structure")
        self.current = 0

    @torch.no_grad()
    def load(self, index: int) -> None:
        """Make set ``index`` the live weights (a no-op when it already is)."""
        if index != self.current:
            torch._foreach_copy_(self.live, self.sets[index], non_blocking=True)
            self.current = index

    def restore(self) -> None:
        """Put the raw weights back, and wait for the copy so the stash can be dropped."""
        self.load(0)
        if any(t.device.type == "cuda" for t in self.live):
            torch.cuda.synchronize()
