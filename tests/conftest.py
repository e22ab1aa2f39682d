"""Shared fixtures: seeding, tolerances by dtype, and a small thread count (CI has 2 cores)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("DETBALANCE_TEST_THREADS", "1")))

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (code under test may use the legacy global RNG)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the CLI's train and compare choose their own thread count
    # fit() and configure_cpu() flush denormals process-wide (right for training, see engine.train);
    # undo it so later tests (hypothesis float strategies, subnormal cases) see IEEE arithmetic.
    torch.set_flush_denormal(False)


@pytest.fixture
def tol():
    """Tolerance table keyed by dtype, for ``torch.testing.assert_close(**tol[dtype])``."""
    return TOLERANCES
