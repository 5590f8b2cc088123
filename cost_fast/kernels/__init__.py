"""Fused Triton kernels of cost_fast, each beside a plain-torch reference of the same math.

gram.py         gram_stats: the Gram matrix of K task gradients and its conflict statistics,
                by the Triton kernel or torch (``resolve_backend``)
gram_triton.py  the fused Triton Gram kernel
gram_torch.py   GramStats and the plain-torch reference
perturb.py      Philox noise on a sphere, regenerated from a seed (Triton and torch)
tensorwise_noise.py  n samples of noise of a fixed norm per tensor, one draw (torch) or two
                launches (Triton, the seed on the device)
"""

from cost_fast.kernels.gram import gram_stats
from cost_fast.kernels.gram_torch import GramStats, gram_stats_torch, stats_from_gram
from cost_fast.kernels.gram_triton import gram_stats_triton, triton_available
from cost_fast.kernels.perturb import sphere_noise, sphere_noise_torch, sphere_perturb_

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
