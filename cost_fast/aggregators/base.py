"""The aggregator interface: the Gram methods' base class ``Aggregator``, the gradient methods'
``GradientAggregator``, and ``WeightsFunction`` (a plain function as a method).

A Gram-based aggregator maps the Gram matrix M = G Gᵀ (K x K) of the task gradients to weights
w ∈ R^K; the update is then d = Gᵀ w = ∇(Σ_i w_i L_i), which ``TaskGradients.combine`` applies
with one matrix-vector product. Solvers run in float64 on the device of the M they are given;
weights come back in M's dtype (float32 for half precision). COST and ``mtl_backward`` give them
M's host copy (``cost_fast.host``): a solve's many small reads then wait for no device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from cost_fast.kernels.gram_torch import check_grad_matrix, gram_torch


def check_gram(gram: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming what is wrong with a Gram matrix."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a (K, K) torch.Tensor, got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (K, K), got shape {tuple(gram.shape)}")
    if gram.shape[0] == 0:
        raise ValueError("gram is 0 x 0: at least one task is needed")
    if not gram.dtype.is_floating_point:
        raise TypeError(f"gram must be floating point, got {gram.dtype}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram contains NaN or inf: the task gradients are not finite")


class Aggregator:
    """Base class of the Gram methods: ``weights(gram) -> w`` (shape (K,)); ``aggregate(G) ->
    Gᵀ w`` (shape (P,)).

    To write one, subclass it and implement ``solve(M) -> w``: ``weights`` checks the Gram
    matrix, symmetrizes it, M = ½(G Gᵀ + (G Gᵀ)ᵀ) in float64, and casts the result back.
    ``@register("name")`` (``cost_fast.registry``) makes it reachable as ``get_aggregator("name")``, in COST and in
    ``mtl_backward``. Calling the object is ``weights``. Stateful methods override
    ``state_dict`` and ``load_state_dict``, as torch.optim optimizers do.

    Example (w_i ∝ 1/‖g_i‖)::

        class InverseNorm(Aggregator):
            def solve(self, gram):
                inverse = gram.diagonal().clamp_min(1e-30).rsqrt()
                return inverse / inverse.sum()
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "gram"

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """Task weights w of shape (K,) from the Gram matrix (K, K), in the Gram matrix's dtype
        (float32 for half-precision input); solved in float64."""
        check_gram(gram)
        out_dtype = gram.dtype if gram.dtype == torch.float64 else torch.float32
        M = gram.to(torch.float64)
        # A float32 G @ G.T is not exactly symmetric; the solvers assume symmetry.
        return self.solve(0.5 * (M + M.T)).to(out_dtype)

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        """The weights w (K,) for a symmetric float64 Gram matrix M (K, K): what a subclass
        implements."""
        raise NotImplementedError(f"{type(self).__name__} must implement solve(gram) -> weights")

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        return self.weights(gram)

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        """The update d = Gᵀ w for the (K, P) gradient matrix G, in float32."""
        check_grad_matrix(G)
        w = self.weights(gram_torch(G)).float()
        G32 = G if G.dtype == torch.float32 else G.float()
        return G32.T @ w

    def state_dict(self) -> dict[str, Any]:
        """The method's state (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; got state keys {sorted(state)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class GradientAggregator(Aggregator):
    """Base class of the methods whose update needs G itself, not only its Gram matrix
    (``kind = "grads"``): implement ``aggregate(G) -> d`` (G of shape (K, P), d of shape (P,));
    ``weights(gram)`` is not defined. The heads then get ∇ Σ_i L_i."""

    kind = "grads"
    # True where the method's state is as large as G (MoCo's K x P): it is then not copied at
    # every step, and a step refused after the method ran (its update or the heads' gradient
    # not finite) leaves the state moved by that step's (finite) G. False (default): the state
    # is copied and put back on such a step.
    state_like_gradients: bool = False

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} needs the gradients themselves: call aggregate(G), not weights(gram)")

    def aggregate(self, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate(G) -> d")


def clone_or_none(value: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of a state tensor, so that a state dict shares no storage with the method (None
    stays None: the state before the first call)."""
    return None if value is None else value.clone()


def check_task_vector(name: str, value: Any) -> torch.Tensor | None:
    """A hyperparameter with one finite number per task (None passes), as float64."""
    if value is None:
        return None
    vector = torch.as_tensor(value, dtype=torch.float64)
    if vector.ndim != 1 or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{name} must be a 1-D vector of finite numbers, got {vector.tolist()!r}")
    return vector


def task_vector_or_mean(vector: torch.Tensor | None, gram: torch.Tensor, owner: str, what: str) -> torch.Tensor:
    """``vector`` on the Gram matrix's device and dtype, or 1/K per task when it is None;
    ``ValueError`` when its length is not K."""
    K = gram.shape[0]
    if vector is None:
        return torch.full((K,), 1.0 / K, dtype=gram.dtype, device=gram.device)
    if vector.shape[0] != K:
        raise ValueError(f"{owner} has {vector.shape[0]} {what}, the Gram matrix {K} tasks")
    return vector.to(dtype=gram.dtype, device=gram.device)


class WeightsFunction(Aggregator):
    """A plain function ``gram -> weights`` as a stateless Gram method: ``solve`` calls it on
    the symmetrized float64 M and checks that it returns K finite weights.

    Args:
        function: ``function(M) -> w``, M of shape (K, K), w of shape (K,).
    """

    name = "function"

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not callable(function):
            raise TypeError(f"function must be callable as function(gram) -> weights, got {type(function).__name__}")
        self.function = function

    def solve(self, gram: torch.Tensor) -> torch.Tensor:
        w = self.function(gram)
        K = gram.shape[0]
        if not isinstance(w, torch.Tensor) or w.shape != (K,):
            got = f"shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{self.function!r} must return a tensor of {K} weights (shape ({K},)), got {got}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{self.function!r} returned non-finite weights {w.tolist()}")
        return w.to(gram)
