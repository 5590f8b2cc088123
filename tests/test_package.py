"""The installed package is whole: every module imports, and under scripts/test.sh it is the
built wheel's copy, not the checkout's."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import cost_fast

# Modules of an optional extra: (the package they need, what their ImportError says without it).
OPTIONAL_EXTRAS = {"cost_fast.lightning": ("lightning", r"pip install 'cost_fast\[lightning\]'")}
# Every module a user may import; a subpackage missing from the wheel fails here.
EXPECTED_PACKAGES = {
    "cost_fast.aggregators",
    "cost_fast.apps",
    "cost_fast.bench",
    "cost_fast.kernels",
    "cost_fast.teleport",
    "cost_fast.weighting",
}


def test_every_module_imports() -> None:
    names = {m.name for m in pkgutil.walk_packages(cost_fast.__path__, prefix="cost_fast.")}
    for package in sorted(EXPECTED_PACKAGES):  # fails if a subpackage is missing from the install
        module = importlib.import_module(package)
        names |= {m.name for m in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")}
    assert len(names) > 30
    for name in sorted(names):
        if name.startswith("cost_fast.bench.test_"):
            continue  # benchmark suites: collected by pytest, not imported by users
        if name in OPTIONAL_EXTRAS and importlib.util.find_spec(OPTIONAL_EXTRAS[name][0]) is None:
            if os.environ.get("COST_FAST_CHECKOUT"):
                raise AssertionError(f"the README's test command installs {OPTIONAL_EXTRAS[name][0]}")
            with pytest.raises(ImportError, match=OPTIONAL_EXTRAS[name][1]):
                importlib.import_module(name)
            continue
        importlib.import_module(name)


def test_installed_copy_is_not_the_checkout() -> None:
    checkout = os.environ.get("COST_FAST_CHECKOUT")
    if checkout is None:
        pytest.skip("COST_FAST_CHECKOUT is not set: run the README's test command (scripts/test.sh) to test the wheel")
    package = Path(cost_fast.__file__).resolve()
    assert Path(checkout).resolve() not in package.parents, f"cost_fast imported from the checkout: {package}"


def test_python_started_in_the_checkout_imports_what_the_package_imports() -> None:
    """No top-level folder of the checkout shadows an installed package: Python started at the
    checkout's root (where '' is on sys.path) imports peft, which imports transformers and so
    Hugging Face's ``kernels``, and cost_fast with its yardstick."""
    checkout = os.environ.get("COST_FAST_CHECKOUT", str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(
        [sys.executable, "-c", "import peft, transformers, cost_fast.yardstick, cost_fast.kernels; print('ok')"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    tops = {p.name for p in Path(checkout).iterdir() if (p / "__init__.py").is_file()}
    assert tops <= {"cost_fast", "bench"}, f"top-level packages that could shadow installed ones: {tops}"
