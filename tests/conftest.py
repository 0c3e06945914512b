"""Test setup: 8 simulated CPU devices, configured before JAX runs any operation."""

import os

# Force CPU even on a GPU host so the multi-device tests see the same 8 devices everywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Exact float32 references: keep XLA from using reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    """Fails (never skips) when the simulated devices are missing."""
    assert len(jax.devices()) == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"
