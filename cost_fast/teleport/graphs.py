"""CUDA graphs of the teleport's adapter step: one capture, then one launch per step.

On a GPU at small batches an adapter step costs its launches, not its arithmetic. With
``TeleportConfig(cuda_graphs=True)`` the teleport runs its first ``WARMUP`` adapter steps
eagerly on a side stream (real steps, which also warm up cuBLAS and autograd, work a capture
must not see), captures the next one into a ``torch.cuda.CUDAGraph`` and replays it for that
step and every later one whose teleport batch has the captured shapes, after copying the batch
into the graph's static input; a batch of other shapes (a smaller last batch) runs eagerly.

What a captured step needs (``refusal`` says which is missing, as a warning, and the teleport
runs eagerly):

- the model and the batches on a CUDA device;
- nothing in the step that the host must decide: the public semantics with ``noise="flat"``
  and its Triton kernel, whose seed lives on the device (the paper semantics reads its arg-max
  sample on the host; the per-tensor stream, and the torch noise, draw from a generator whose
  state a replay would not move on);
- one process (the sums over the ranks are collectives outside the graph);
- the adapter's Adam built capturable (``adapter_optimizer(capturable=True)``: its step counts
  on the device), which ``teleport`` does.

A capture that fails (a loss that reads the host, an operation that cannot be captured) is
warned about once, with torch's reason, and the step and the rest of the teleport run eagerly:
a failed capture executes nothing, so the adapter is where the last eager step left it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cost_fast.teleport.perturbed import same_shapes

WARMUP = 2  # eager steps before the capture (the whole-network capture recipe uses a few)
StepFn = Callable[[Any], tuple[torch.Tensor, ...]]


class CaptureRefused(RuntimeWarning):
    """The teleport's adapter steps run eagerly although ``cuda_graphs=True``; the message says why."""


def refusal(
    semantics: Any, device: torch.device, current_batch: Any, *, parallel: bool, triton_noise: bool
) -> str | None:
    """Why the adapter step cannot be captured (module docstring), or None when it can.
    ``triton_noise``: whether the flat noise runs on its Triton kernel. The teleport batches'
    devices are checked when the capture is made (``GraphedStep``)."""
    if device.type != "cuda":
        return f"CUDA graphs need the model on a CUDA device, it is on {device.type}"
    if parallel:
        return "CUDA graphs are not used with a process group (the adapter's gradients are summed over the ranks)"
    if getattr(semantics, "noise", None) != "flat":
        if semantics.name == "paper":
            what = "the paper semantics reads its arg-max sample on the host"
        else:
            what = "the per-tensor noise draws from a generator that a replay would not move on"
        return f"CUDA graphs need the public semantics with noise='flat': {what}"
    if not triton_noise:
        return (
            "CUDA graphs need the flat noise's Triton kernel (triton is not installed): "
            "the torch noise's generator would not move on"
        )
    return off_device(current_batch, device)


def off_device(batch: Any, device: torch.device) -> str | None:
    """Why ``batch`` cannot be a captured step's input (a tensor elsewhere than ``device``), or None."""
    for leaf in torch.utils._pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.device != device:
            return f"CUDA graphs need the batches on the model's device ({device}), a batch holds a tensor on {leaf.device}"
    return None


class CudaGraphs:
    """The CUDA graph operations ``GraphedStep`` uses (a stand-in replaces them in CPU tests)."""

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Eager warm-up work on a side stream, joined back to the current one afterwards."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]) -> Any:
        """``fn`` captured into a graph, not executed: (graph, its static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        return graph, outputs

    def replay(self, captured: Any) -> tuple[torch.Tensor, ...]:
        """One launch of the captured graph; its static outputs, overwritten by the next."""
        graph, outputs = captured
        graph.replay()
        return outputs


class GraphedStep:
    """``step(batch)`` (one adapter step, returning detached tensors) run eagerly for its first
    ``warmup`` calls, then captured once and replayed (module docstring). Returns copies of
    the step's outputs (a replay overwrites the static ones). ``note`` is ``"captured"`` once a
    capture is in use, else None, or why the steps run eagerly."""

    def __init__(
        self,
        step: StepFn,
        *,
        device: torch.device,
        before_capture: Callable[[], None],
        warmup: int = WARMUP,
        graphs: Any = None,
    ) -> None:
        self.step, self.device, self.warmup, self.before_capture = step, device, warmup, before_capture
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.calls = 0
        self.graph: Any = None
        self.static_batch: Any = None
        self.note: str | None = None

    def __call__(self, batch: Any) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        if self.graph is None and self.note is None and self.calls > self.warmup:
            self._capture(batch)
        if self.graph is not None and same_shapes(self.static_batch, batch):
            torch.utils._pytree.tree_map(_copy_into, self.static_batch, batch)
            return tuple(out.clone() for out in self.graphs.replay(self.graph))
        if self.graph is None and self.note is None:  # warm-up
            with self.graphs.side_stream():
                return self.step(batch)
        return self.step(batch)

    def _capture(self, batch: Any) -> None:
        self.note = off_device(batch, self.device)
        if self.note is not None:
            warnings.warn(f"{self.note}; the adapter steps run eagerly", CaptureRefused, stacklevel=3)
            return
        static = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, batch)
        try:
            self.before_capture()
            self.graph = self.graphs.capture(lambda: self.step(static))
        except Exception as err:  # noqa: BLE001 - any capture failure: eager from here on, said once
            self.graph, self.note = None, f"the capture failed ({type(err).__name__}: {err})"
            warnings.warn(f"{self.note}; the adapter steps run eagerly", CaptureRefused, stacklevel=3)
            self.before_capture()  # nothing of the failed capture is kept (its gradients)
            return
        self.static_batch, self.note = static, "captured"


def _copy_into(static: Any, given: Any) -> Any:
    if isinstance(static, torch.Tensor):
        static.copy_(given)
    return static
