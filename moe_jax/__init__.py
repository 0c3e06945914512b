"""moe_jax: sparse Mixture-of-Experts models with expert parallelism in JAX/Flax.

The MoE layer imports only jax/flax/numpy; the trainer, data pipeline and quick API are imported lazily on
first use, so ``from moe_jax import MoeLayer`` works where only JAX is installed.
"""

import importlib

from moe_jax.moe import MoeLayer, update_selection_bias

__version__ = "0.1.0"

_LAZY = {"SparseMoeModel": "moe_jax.api"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_jax' has no attribute {name!r}")


__all__ = ["MoeLayer", "SparseMoeModel", "update_selection_bias"]
