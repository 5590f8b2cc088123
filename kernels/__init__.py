"""Fused Triton kernels of cost_fast, each beside a plain-torch reference of the same math.

Installed as ``cost_fast.kernels`` (the source folder is the top-level ``kernels/``).
"""

from .gram import (
    GramStats,
    gram_stats,
    gram_stats_torch,
    gram_stats_triton,
    stats_from_gram,
    triton_available,
)
from .perturb import sphere_noise, sphere_noise_torch, sphere_perturb_

__all__ = [
    "GramStats",
    "gram_stats",
    "gram_stats_torch",
    "gram_stats_triton",
    "stats_from_gram",
    "sphere_noise",
    "sphere_noise_torch",
    "sphere_perturb_",
    "triton_available",
]
