"""Packaging. ``cost_fast`` and its subpackages are found, not listed, so a new subpackage can
never be left out of the wheel. The top-level ``bench/`` folder installs as ``cost_fast.bench``
(so that ``cost-fast bench`` finds its suites in any install)."""

from setuptools import find_packages, setup

# Folders outside cost_fast/ that install inside it: {installed name: source folder}.
MAPPED = {"cost_fast.bench": "bench"}


def mapped_packages() -> list[str]:
    """Every package under each mapped folder, named as installed."""
    found = []
    for name, folder in MAPPED.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


PACKAGES = find_packages(include=["cost_fast", "cost_fast.*"]) + mapped_packages()

setup(
    name="cost_fast",
    version="0.1.0",
    description="Fast gradient-based multi-task learning and COST symmetry teleportation for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"cost_fast": "cost_fast", **MAPPED},
    # data files inside the packages: the experiments' single-task baselines
    package_data={"cost_fast.experiments": ["*.json"]},
    # Ranges, so that a user keeps the (CUDA) torch build they already have.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "peft>=0.13",
        "numpy>=1.24",
    ],
    extras_require={
        # torchjd: the tests hold mtl_backward and its torchjd adapters to torchjd itself
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "scipy>=1.10",
            "torchjd[quadprog-projector]>=0.18",
        ],
        # reference solvers for bench/test_bench_solvers.py
        "bench": ["cvxpy>=1.4", "ecos>=2.0"],
        # `cost-fast demo`: the digits data set, plots, progress bar
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.7", "tqdm>=4.60"],
        # cost_fast.lightning: COSTModule
        "lightning": ["lightning>=2.2"],
        # `cost-fast train`: CelebA's JPEGs, plots, progress bar
        "experiments": ["pillow>=9", "matplotlib>=3.7", "tqdm>=4.60"],
    },
    entry_points={"console_scripts": ["cost-fast = cost_fast.apps.cli:main"]},
)
