"""The installed package is whole: every module imports, and under scripts/test.sh it is the
built wheel's copy, not the checkout's."""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import pytest

import cost_fast

# Modules of an earlier release that now only say where their contents went.
RENAMED_MODULES = {"cost_fast.reference": "renamed cost_fast.yardstick"}
# Every module a user may import; a subpackage missing from the wheel fails here.
EXPECTED_PACKAGES = {"cost_fast.aggregators", "cost_fast.weighting", "cost_fast.kernels", "cost_fast.bench"}


def test_every_module_imports() -> None:
    names = {m.name for m in pkgutil.walk_packages(cost_fast.__path__, prefix="cost_fast.")}
    for package in sorted(EXPECTED_PACKAGES):  # fails if a subpackage is missing from the install
        module = importlib.import_module(package)
        names |= {m.name for m in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")}
    assert len(names) > 30
    for name in sorted(names):
        if name.startswith("cost_fast.bench.test_"):
            continue  # benchmark suites: collected by pytest, not imported by users
        if name in RENAMED_MODULES:
            with pytest.raises(ImportError, match=RENAMED_MODULES[name]):
                importlib.import_module(name)
            continue
        importlib.import_module(name)


def test_installed_copy_is_not_the_checkout() -> None:
    checkout = os.environ.get("COST_FAST_CHECKOUT")
    if checkout is None:
        return  # a plain `pytest` from an editable install: nothing to compare
    package = Path(cost_fast.__file__).resolve()
    assert Path(checkout).resolve() not in package.parents, f"cost_fast imported from the checkout: {package}"
