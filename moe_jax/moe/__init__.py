"""Sparse Mixture-of-Experts: routers, dispatchers, expert FFNs and the layer that joins them.

Shape letters used in tensor names throughout (``x_GSD``, ``w_EDF``):
    B batch, L length, D d_model, F d_ff, E experts, K experts per token, C capacity per expert (per group),
    G groups, S tokens per group, T tokens (= B·L), N assignments per group (S·K for token choice, E·C for
    expert choice), M assignment rows of a grouped matmul, H heads, V vocab.

Only jax/flax/optax/numpy are imported here, so the layer and its benchmark run on machines without the data
and training stack.
"""

from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routing import Routing, update_selection_bias

__all__ = ["MoeLayer", "Routing", "update_selection_bias"]
