"""Run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and so cost_fast.kernels) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
