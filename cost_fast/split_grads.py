"""Per-task gradients split at the backbone's output: the heads' backward once for all tasks.

With z = backbone(x) (one tensor or several) and the task losses L_i computed from z by the
heads, the chain rule gives each task's gradient of the shared parameters θ as

    Z_i = ∂L_i/∂z                 for all K tasks in one batched backward pass through the heads,
    G[i] = J_zᵀ Z_i = ∂L_i/∂θ     K backward passes through the backbone only (or one batched),

the same G as K plain backward passes, each of which walks every head: L_i is one column of the
stacked outputs, so the plain loop runs the backward of all K heads K times (zeros for K - 1 of
them). With K = 40 linear heads that is most of a step's kernels.

It holds when the losses reach θ only through the backbone's output. ``SplitTaskGradients``
checks what it can: a step where the backbone ran other than once with grad since the last
``compute`` (called twice, or not at all) takes the plain loop; and the first step computes G
both ways and keeps to the plain loop, with a warning, if they differ (a loss that uses θ
directly: tied weights, a penalty on the backbone's weights).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cost_fast.grads import Mode, TaskGradients, _store_gradients, task_output_gradients


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output that require grad (in a tuple, list or dict too)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.requires_grad else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return []


class OutputCapture:
    """A forward hook on the backbone that keeps the output of its last forward pass with grad
    and counts those passes since ``take()``; ``close()`` removes it.

    Args:
        backbone: the shared module.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.calls = 0
        self._paused = False
        self.hook = backbone.register_forward_hook(self._capture)

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle of the model carries its hooks: theirs capture nothing of ours (the
        # captured outputs are inside the graph, which cannot be copied).
        return {"outputs": [], "calls": 0, "_paused": False, "hook": None}

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        tensors = _tensors(output)
        if tensors and not self._paused:
            self.outputs, self.calls = tensors, self.calls + 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes in the block (a teleport's) are not captured."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @staticmethod
    def paused_if(capture: OutputCapture | None) -> contextlib.AbstractContextManager:
        """``capture.paused()``, or nothing to pause without a capture."""
        return contextlib.nullcontext() if capture is None else capture.paused()

    def take(self) -> tuple[list[torch.Tensor], int]:
        """The last captured output and the passes since the last ``take``; forgets both."""
        taken = self.outputs, self.calls
        self.outputs, self.calls = [], 0
        return taken

    def close(self) -> None:
        """Remove the hook."""
        if self.hook is not None:
            self.hook.remove()


class SplitTaskGradients(TaskGradients):
    """``TaskGradients`` that splits each task's backward pass at the backbone's output (module
    docstring); the same interface and the same G.

    Args:
        params, num_tasks: as ``TaskGradients``.
        capture: the ``OutputCapture`` on the backbone whose forward pass produced the losses.
        mode: the backbone's K passes as a loop (``"loop"``, default) or one batched call.

    Attributes:
        split_off: None while the split is used; else why this engine keeps to the plain loop.
    """

    def __init__(
        self, params: Iterable[torch.Tensor], num_tasks: int, capture: OutputCapture, *, mode: Mode = "loop"
    ) -> None:
        super().__init__(params, num_tasks, mode=mode)
        self.capture = capture
        self.split_off: str | None = None
        self._checked = False

    def compute(self, losses: torch.Tensor, *, retain_graph: bool = False, share: float = 1.0) -> torch.Tensor:
        """Fill and return G (``TaskGradients.compute``), split at the backbone's output when
        that is known to give the same G."""
        outputs, calls = self.capture.take()
        if self.split_off is not None or calls != 1:
            return super().compute(losses, retain_graph=retain_graph, share=share)
        self._check_losses(losses)
        if not self._split(losses, outputs, retain_graph=retain_graph or not self._checked):
            return super().compute(losses, retain_graph=retain_graph, share=share)
        if not self._checked:  # the first step: G both ways (the plain loop's is kept)
            split = self.grads.clone()
            super().compute(losses, retain_graph=retain_graph)
            scale = self.grads.abs().max()
            self._checked = bool(torch.isfinite(scale))  # a non-finite G proves nothing: the next step checks
            if self._checked and not bool((split - self.grads).abs().max() <= 1e-4 * scale):
                self.split_off = "the losses reach the backbone's parameters other than through its output"
                warnings.warn(
                    f"per-task gradients: {self.split_off} (tied weights, a penalty on them?); "
                    "every task's backward pass walks the whole graph from now on",
                    stacklevel=3,
                )
        if share != 1.0:
            self.grads.mul_(share)
        return self.grads

    def _split(self, losses: torch.Tensor, outputs: list[torch.Tensor], *, retain_graph: bool) -> bool:
        """G into ``grads`` through ``outputs``; False where the losses do not reach them."""
        per_output = task_output_gradients(losses, outputs, self._eye.to(losses.dtype))  # the heads, once
        reached = [(z, g) for z, g in zip(outputs, per_output) if g is not None]
        if not reached:
            return False
        zs, vectors = [z for z, _ in reached], [g for _, g in reached]
        if self.mode == "batched":
            grads = torch.autograd.grad(
                zs,
                self.params,
                grad_outputs=vectors,
                retain_graph=retain_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
            _store_gradients(self.views, grads)
            return True
        last = self.num_tasks - 1
        for i in range(self.num_tasks):
            grads = torch.autograd.grad(
                zs,
                self.params,
                grad_outputs=[v[i] for v in vectors],
                retain_graph=retain_graph or i < last,
                allow_unused=True,
            )
            _store_gradients([v[i] for v in self.views], grads)
        return True
