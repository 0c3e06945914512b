"""Sparse upcycling: a dense decoder LM becomes an MoE one whose step-0 outputs equal the dense model's.

Every FFN of the chosen blocks becomes ``num_experts · granularity`` experts of width ``d_ff /
granularity``: expert ``i`` holds slice ``i % granularity`` of copy ``i // granularity`` of the dense FFN
(SwiGLU acts elementwise over the hidden units, so the dense FFN is the sum of its slices), and each token
uses ``top_k · granularity`` of them with renormalised gates.

Why step 0 is exact:

* ``granularity=1``: the K selected experts are identical copies and the gates sum to one, so the output is
  the dense FFN's whatever the router says. The router starts random (small), so tokens already spread.
* ``granularity=g>1``: the router starts at zero; every expert then ties and top-K picks the first K·g
  experts (lowest index wins ties), which are K copies of each of the g slices, each with gate 1/(K·g). The
  slices' down projections are multiplied by g, so the output is the dense FFN again. Copies of one slice
  stay identical under training unless ``noise_std`` > 0.

``noise_std`` adds N(0, (noise_std · std(w))²) to every copy of every expert matrix (breaking the symmetry
between copies; the outputs are then only approximately the dense model's).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.models import DecoderLM, ModelConfig


def upcycle(
    model: DecoderLM,
    config,
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    layers: Sequence[int] | None = None,
    noise_std: float = 0.0,
    router_std: float = 0.02,
    seed: int = 0,
):
    """Turns a dense :class:`~moe_jax.models.DecoderLM` into an MoE one (module docstring).

    Args:
        model: the dense LM (every block dense).
        config: its config (``configs/lm.py``'s shape, e.g. from :func:`moe_jax.interop.hf.load`).
        num_experts: E copies of the dense FFN.
        top_k: K copies each token uses.
        granularity: g slices per copy (fine-grained experts of width d_ff / g); ``d_ff`` must divide.
        layers: the blocks to upcycle; default all.
        noise_std: relative noise on the expert copies (0: exact at step 0).
        router_std: standard deviation of the initial router (``granularity=1``; zero otherwise).
        seed: randomness of the router and the noise.

    Returns:
        ``(moe_model, moe_config)``; ``moe_config.model.moe`` holds the MoE section (dropless, renormalised
        gates), ``moe_config.hf.architecture`` is cleared (the MoE model is exported as the architecture
        that fits it).

    Raises:
        ValueError: a model that is not dense, or sizes that do not fit (naming the argument).
    """
    cfg = model.cfg
    if cfg.moe_layers(cfg.num_decoder_layers):
        raise ValueError("upcycle: the model already has MoE blocks; upcycle a dense model")
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("granularity", granularity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"upcycle: {name}={value!r} must be a positive integer")
    if top_k > num_experts:
        raise ValueError(f"upcycle: top_k={top_k} must be <= num_experts={num_experts}")
    if cfg.d_ff % granularity:
        raise ValueError(f"upcycle: granularity={granularity} must divide the dense d_ff={cfg.d_ff}")
    if not noise_std >= 0:
        raise ValueError(f"upcycle: noise_std={noise_std!r} must be >= 0")
    layers = tuple(range(cfg.num_decoder_layers)) if layers is None else tuple(sorted(layers))
    if any(not 0 <= i < cfg.num_decoder_layers for i in layers):
        raise ValueError(f"upcycle: layers={layers} must be block indices in [0, {cfg.num_decoder_layers})")
    E, g = num_experts * granularity, granularity
    Fg = cfg.d_ff // g
    moe = dict(
        num_experts=E,
        top_k=top_k * g,
        d_ff=Fg,
        layers=layers,
        normalize_gates=True,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    new_config = copy.deepcopy(config)
    new_config.model.moe.update(moe)
    new_cfg = ModelConfig.from_mapping(
        new_config.model.to_dict(), path="config.model", vocab_size=cfg.vocab_size
    )
    if new_config.get("hf") is not None:
        new_config.hf.architecture = None

    rng = np.random.default_rng(seed)
    old = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    abstract = nnx.eval_shape(lambda: DecoderLM(new_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    for key, variable in flat.items():
        block = key[2] if key[:2] == ("decoder", "layers") else None
        if block in layers and key[3] == "ffn":
            value = _expert_value(key[4], old, key[:4], num_experts, g, Fg, noise_std, router_std, rng)
            variable.set_value(jnp.asarray(value, variable.get_value().dtype))
        else:
            variable.set_value(old[key])
    moe_model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    moe_model.eval()
    return moe_model, new_config


def _expert_value(name, old, ffn, copies, g, Fg, noise_std, router_std, rng) -> np.ndarray:
    """One MoE parameter (``router``, ``w_gate``, ``w_up``, ``w_down``) built from the dense FFN ``ffn``."""
    if name == "router":
        D = np.asarray(old[(*ffn, "w_up")]).shape[0]
        if g > 1:
            return np.zeros((D, copies * g), np.float32)
        return rng.normal(0.0, router_std, (D, copies)).astype(np.float32)
    dense = np.asarray(jax.device_get(old[(*ffn, name)]), np.float32)
    experts = []
    for i in range(copies * g):
        j = i % g
        if name == "w_down":  # [F, D]: rows of slice j, times g (module docstring)
            w = dense[j * Fg : (j + 1) * Fg] * np.float32(g if g > 1 else 1)
        else:  # [D, F]: columns of slice j
            w = dense[:, j * Fg : (j + 1) * Fg]
        if noise_std:
            w = w + rng.normal(0.0, noise_std * float(w.std()), w.shape).astype(np.float32)
        experts.append(w)
    return np.stack(experts)
