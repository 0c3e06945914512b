"""A few MoE training steps on a global mesh, run identically by 1 process × 8 devices or N processes.

As a script (one per process): ``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json``.
"""

import json
import sys

import numpy as np

B, L, D, F, E, K = 8, 8, 16, 32, 8, 2
STEPS = 3


def run_steps(
    expert_parallel: str, preset: str = "ep", mesh_shape=None, devices=None, return_params: bool = False
):
    """Losses of STEPS Adam steps of a MoE regression (default: the ``data × expert`` mesh of all devices).

    With ``return_params`` also the final parameters as NumPy arrays (equal parameters after 3 steps of
    Adam mean equal gradients at every step).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import PartitionSpec

    from moe_jax import MoeLayer, distributed, sharding

    mesh = sharding.make_mesh(mesh_shape or {"data": 2, "expert": -1}, devices)
    rules = sharding.preset_rules(preset)
    layer = MoeLayer(D, F, E, K, capacity_factor=1.25, expert_parallel=expert_parallel, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params = sharding.shard_state(params, mesh, rules)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    rng = np.random.default_rng(0)
    x_all = rng.standard_normal((STEPS, B, L, D)).astype(np.float32)
    target_all = rng.standard_normal((STEPS, B, L, D)).astype(np.float32)
    rows = distributed.process_slice(B)
    batch_spec = PartitionSpec(("data", "fsdp", "expert"))

    @jax.jit
    def train_step(params, opt_state, x, target):
        def loss_fn(params):
            y, aux = nnx.merge(graphdef, params, rest)(x)
            return jnp.mean((y - target) ** 2) + 0.01 * aux["load_balancing_loss"]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for s in range(STEPS):
            x = distributed.global_batch(x_all[s][rows], mesh, batch_spec)
            target = distributed.global_batch(target_all[s][rows], mesh, batch_spec)
            params, opt_state, loss = train_step(params, opt_state, x, target)
            losses.append(float(loss))
    if return_params:
        return losses, jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    return losses


if __name__ == "__main__":
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from moe_jax import distributed

    distributed.initialize(
        f"127.0.0.1:{port}", num_processes, process_id, local_cpu_devices=8 // num_processes
    )
    result = {ep: run_steps(ep) for ep in ("gspmd", "shard_map")}
    with open(out, "w") as f:
        json.dump(result, f)
