"""Run the Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and so cost_fast.kernels) is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_mode_restored():
    """A test that switches torch's deterministic algorithms on (Lightning's
    ``Trainer(deterministic=True)`` does, for the whole process) leaves the next test as it found it."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
