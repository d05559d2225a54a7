"""The cpu_fused extension, built (or loaded from the cache) once per test module."""

from __future__ import annotations

import os
import shutil
import types
import warnings

import pytest

from qtrain.kernels import cpu_fused


@pytest.fixture(scope="module")
def fused() -> types.ModuleType:
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
