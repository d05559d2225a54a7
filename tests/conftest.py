"""Shared test set-up: a Hypothesis profile sized for CI, the kernel backends to run under, and
the cpu_fused extension."""

from __future__ import annotations

import os
import shutil
import types
import warnings

import pytest
import torch
from hypothesis import settings

from qtrain import kernels
from qtrain.kernels import cpu_fused

# deadline=None: the first call of a kernel (or a compile) must not count as a flaky example.
settings.register_profile("qtrain", deadline=None, max_examples=25)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "qtrain"))


@pytest.fixture(params=["reference", "auto"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run a test under the reference kernels and under what ``Backend.AUTO`` picks here."""
    if request.param == "auto" and (
        kernels.implementation(torch.device("cpu"), "auto") is kernels.reference
    ):
        pytest.skip("Backend.AUTO resolves to the reference backend on this machine")
    with kernels.use_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def fused() -> types.ModuleType:
    """The cpu_fused extension, built (or loaded from the cache) once per test module."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = cpu_fused.load()
    if module is None:
        # No compiler: the documented fallback, skip. With a compiler, a failed build is a bug
        # (a compile error in quant.cpp must fail the suite, not skip it).
        if shutil.which(os.environ.get("CXX", "c++")) is not None:
            pytest.fail(
                f"the cpu_fused extension failed to build: {[str(w.message) for w in caught]}"
            )
        pytest.skip("the cpu_fused extension cannot be built here: no C++ compiler")
    return module
