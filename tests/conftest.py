"""Shared test set-up: a Hypothesis profile sized for CI, and the kernel backends to run under."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from qtrain import kernels

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
