"""The Gram statistics in plain torch: ``GramStats``, the statistics from a Gram matrix
(``stats_from_gram``) and the torch backend of ``gram_stats`` (``gram_stats_torch``), the
reference the Triton kernel (``cost_fast.kernels.gram_triton``) is tested against. The formulas
are in ``cost_fast.kernels.gram``'s docstring."""

from __future__ import annotations

import dataclasses

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclasses.dataclass(frozen=True)
class GramStats:
    """Gram matrix and conflict statistics of K task gradients; every field is a device tensor.

    Attributes:
        gram: ``M = G Gᵀ``, shape (K, K), float32.
        norms: ``‖g_i‖``, shape (K,).
        dot_mean: ``g_i · g0`` with ``g0`` the mean gradient, shape (K,).
        cos_mean: ``cos(g_i, g0)``, shape (K,), 0 where a norm is 0, clamped to [-1, 1].
        mean_norm: ``‖g0‖``, shape ().
        num_dominated: number of tasks with ``cos(g_i, g0) < 0``, int64 shape ().
        num_conflicting_pairs: number of pairs ``i < j`` with ``cos(g_i, g_j) < 0``, int64 shape ().
        trigger: ``not nonfinite and num_dominated ≥ ⌈K/2⌉``, bool shape ().
        nonfinite: True if any entry of ``M`` is NaN or ±inf (then the statistics are not
            trustworthy and ``trigger`` is False), bool shape ().
    """

    gram: torch.Tensor
    norms: torch.Tensor
    dot_mean: torch.Tensor
    cos_mean: torch.Tensor
    mean_norm: torch.Tensor
    num_dominated: torch.Tensor
    num_conflicting_pairs: torch.Tensor
    trigger: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return self.gram.shape[0]

    def unscaled(self, scale: torch.Tensor | float) -> GramStats:
        """The statistics of G / s, from those of gradients G of losses scaled by s > 0 (an AMP
        ``GradScaler``'s scale): M / s², ‖g_i‖ / s, g_i·g0 / s², ‖g0‖ / s; the cosines, the
        counts and the flags do not depend on s. No host read."""
        s = torch.as_tensor(scale, dtype=self.gram.dtype, device=self.gram.device)
        return dataclasses.replace(
            self,
            gram=self.gram / (s * s),
            norms=self.norms / s,
            dot_mean=self.dot_mean / (s * s),
            mean_norm=self.mean_norm / s,
        )


def check_grad_matrix(G: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming what is wrong with a K x P gradient matrix."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"gradients must be a torch.Tensor of shape (K, P), got {type(G).__name__}")
    if G.ndim != 2:
        raise ValueError(f"gradients must have shape (K, P) (one row per task), got {G.ndim}-D shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise ValueError("gradients have K = 0 rows: at least one task is needed")
    if G.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gradients must be float32, float16, bfloat16 or float64, got {G.dtype}")


def upcast_16bit(G: torch.Tensor) -> torch.Tensor:
    """G in the dtype sums over it accumulate in: float32 for 16-bit G (a copy), else G itself."""
    return G if G.dtype in (torch.float32, torch.float64) else G.float()


def stats_from_gram(gram: torch.Tensor) -> GramStats:
    """All conflict statistics from a Gram matrix ``M`` (K x K), in plain torch, on M's device.

    Formulas are in the module docstring. No host synchronization.
    """
    K = gram.shape[0]
    gram = gram if gram.dtype == torch.float64 else gram.float()
    nonfinite = ~torch.isfinite(gram).all()
    norms = gram.diagonal().clamp_min(0).sqrt()
    dot_mean = gram.sum(dim=1) / K
    mean_norm = (dot_mean.sum() / K).clamp_min(0).sqrt()
    denom = norms * mean_norm
    cos_mean = torch.where(denom > 0, dot_mean / denom, torch.zeros_like(dot_mean)).clamp(-1.0, 1.0)
    num_dominated = (dot_mean < 0).sum()
    num_pairs = torch.triu(gram < 0, diagonal=1).sum()
    trigger = ~nonfinite & (2 * num_dominated >= K)
    return GramStats(
        gram=gram,
        norms=norms,
        dot_mean=dot_mean,
        cos_mean=cos_mean,
        mean_norm=mean_norm,
        num_dominated=num_dominated,
        num_conflicting_pairs=num_pairs,
        trigger=trigger,
        nonfinite=nonfinite,
    )


# Columns per chunk of the torch backend's accumulation.
TORCH_GRAM_CHUNK = 16384


def gram_torch(G: torch.Tensor) -> torch.Tensor:
    """``M = G Gᵀ`` in float32 (float64 for float64 G), accumulated per column chunk:
    ``M = Σ_c G[:, c] G[:, c]ᵀ``.

    One long fp32 dot product per entry (what ``G @ G.T`` does for few rows on CPU) reaches
    ~1e-4 relative error at P = 1e6; summing the chunks' products (one batched matmul over a
    view of G, no copy for fp32, plus one for the tail) stays near 1e-7 and was faster on CPU
    in our measurements.
    """
    K, P = G.shape
    G_acc = upcast_16bit(G)
    n = P // TORCH_GRAM_CHUNK
    tail = G_acc[:, n * TORCH_GRAM_CHUNK :]
    gram = tail @ tail.T
    if n:
        chunks = G_acc[:, : n * TORCH_GRAM_CHUNK].unflatten(1, (n, TORCH_GRAM_CHUNK)).transpose(0, 1)
        gram = gram + torch.bmm(chunks, chunks.transpose(1, 2)).sum(dim=0)
    return gram


def gram_stats_torch(G: torch.Tensor) -> GramStats:
    """Plain-torch ``gram_stats``: ``gram_torch`` (fp32, or fp64 for fp64 G), then ``stats_from_gram``."""
    check_grad_matrix(G)
    return stats_from_gram(gram_torch(G))
