"""Every sharding preset, on several mesh shapes and both expert-parallel paths, trains exactly like 1 device.

Three Adam steps of a MoE regression (``tests/multiprocess_worker.py``): losses and final parameters (hence
every step's gradients) equal the single-device run to 1e-5.
"""

import jax
import numpy as np
import pytest

from tests.multiprocess_worker import run_steps

TOL = 1e-5
MESHES = {
    "d2f2e2": {"data": 2, "fsdp": 2, "expert": 2},
    "e8": {"expert": 8},
    "d2e2t2": {"data": 2, "expert": 2, "tensor": 2},
}
SINGLE = {"data": 1}


def _single(expert_parallel):
    return run_steps(expert_parallel, "ep", SINGLE, jax.devices()[:1], return_params=True)


CASES = [(p, m, "gspmd") for p in ("dp", "fsdp", "ep", "ep_fsdp", "ep_tp") for m in MESHES] + [
    (p, m, "shard_map") for p in ("ep", "ep_fsdp", "ep_tp") for m in MESHES
]
DEFAULT = {("ep", "d2f2e2", "gspmd"), ("ep_tp", "d2e2t2", "shard_map"), ("fsdp", "e8", "gspmd")}


@pytest.mark.parametrize(
    "preset, mesh, expert_parallel",
    [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
)
def test_three_steps_equal_single_device(preset, mesh, expert_parallel):
    want_losses, want_params = _single(expert_parallel)
    losses, params = run_steps(expert_parallel, preset, MESHES[mesh], return_params=True)
    np.testing.assert_allclose(losses, want_losses, rtol=TOL, atol=TOL)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path))
