"""Parameter counts of a model: total, and active per token (what one token's forward touches).

Works on an abstract model (``nnx.eval_shape``), so the plan-only shapes (hundreds of billions of
parameters) are counted without allocating them.
"""

from __future__ import annotations

import math

from flax import nnx

from moe_jax.moe import MoeLayer


def _size(variable) -> int:
    return math.prod(variable.get_value().shape)


def parameter_counts(model: nnx.Module) -> dict[str, int]:
    """``{'total', 'active', 'routed'}`` parameter counts of ``model``.

    ``active`` counts every parameter except the routed experts a token does not use: of each MoE layer's
    E routed experts, K are active (shared experts, routers, attention, norms, embeddings and the output
    head all count; a tied table counts once). ``routed`` is the routed experts' total.
    """
    total = sum(_size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    inactive = routed = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoeLayer):
            weights = [w for w in (node.w_gate, node.w_up, node.w_down) if w is not None]
            layer_routed = sum(_size(w) for w in weights)
            routed += layer_routed
            inactive += layer_routed * (node.num_experts - node.top_k) // node.num_experts
    return {"total": total, "active": total - inactive, "routed": routed}


def abstract_model(build):
    """The module ``build()`` returns, with shapes only (no parameter memory)."""
    return nnx.eval_shape(build)
