"""Scanned layers (``model.scan_layers=True``): repeated blocks stacked on a ``layers`` axis, run by a scan.

An unrolled stack of N blocks compiles N copies of the block; on a pod-sized model (32-61 layers) that is
most of the compile time and the HLO. With scanned layers a stack is split as::

    blocks 0 .. lead-1            unrolled (e.g. DeepSeek's first dense layers)
    blocks lead .. N-1            U repeats of a unit of p blocks (p = 1 when every layer is MoE, 2 for
                                  "dense, MoE" alternating), each unit position's parameters stacked
                                  [U, ...] on the leading logical axis ``layers`` and run by ``nnx.scan``

(:func:`scan_layout` picks the smallest ``lead``, then the smallest period). Every block keeps the dropout
key, the remat policy and the aux key (``<stack>/layer_<i>``) it has unrolled, so the two forms compute the
same function; :func:`to_scanned` / :func:`to_unscanned` convert a model's state (and so a checkpoint) from
one form to the other.

KV caches (decoding) follow the same split: one ``{"k", "v"}`` per unrolled block, then one per unit
position with a leading [U] axis (:meth:`ScannedBlocks.init_caches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.models.blocks import Block, _remat_call


def scan_layout(is_moe: Sequence[bool]) -> tuple[int, int]:
    """``(lead, period)`` of a stack whose block i has an MoE FFN iff ``is_moe[i]``.

    Blocks ``lead..N-1`` repeat a unit of ``period`` blocks at least twice; the smallest such ``lead``, then
    the smallest period, is chosen. ``(N, 0)``: nothing repeats, every block stays unrolled.
    """
    n = len(is_moe)
    for lead in range(n):
        for period in range(1, (n - lead) // 2 + 1):
            if (n - lead) % period == 0 and all(
                is_moe[i] == is_moe[lead + (i - lead) % period] for i in range(lead, n)
            ):
                return lead, period
    return n, 0


def stack_layout(num_layers: int, moe_layers: Sequence[int]) -> tuple[int, int, int]:
    """``(lead, period, units)`` of a stack (see :func:`scan_layout`)."""
    moe = set(moe_layers)
    lead, period = scan_layout([i in moe for i in range(num_layers)])
    return lead, period, (num_layers - lead) // period if period else 0


class ScannedBlocks(nnx.Module):
    """Blocks ``lead .. lead + units·period - 1`` of a stack as ``period`` stacked blocks, run by a scan.

    Args:
        lead: index of the first scanned block in its stack (for dropout keys and aux names).
        units: U, how often the unit repeats.
        unit_moe: per unit position, the MoE config of its FFN or None for a dense one.
        block_kwargs: the :class:`~moe_jax.models.blocks.Block` arguments shared by all blocks.
        rngs: initialisation randomness (split U ways per unit position).
    """

    def __init__(self, lead: int, units: int, unit_moe: Sequence, *, rngs: nnx.Rngs, **block_kwargs):
        self.lead, self.units, self.period = lead, units, len(unit_moe)

        def stacked(moe):
            @nnx.split_rngs(splits=units)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(rngs):
                return Block(moe=moe, **block_kwargs, rngs=rngs)

            return create(rngs)

        self.unit = nnx.List([stacked(moe) for moe in unit_moe])

    def layer_index(self, u: int, j: int) -> int:
        """Stack index of unit ``u``'s block ``j``."""
        return self.lead + u * self.period + j

    def __call__(self, x_BLD, *, name: str, dropout_key=None, caches=None, remat_policy="none", **kwargs):
        """``(x_BLD, aux)``, or ``(x_BLD, aux, caches)`` with ``caches`` (one stacked per unit position).

        ``kwargs`` go to every block (they are the same for every layer, so the scan closes over them).
        """
        U, p = self.units, self.period
        index_UP = np.arange(U)[:, None] * p + np.arange(p)[None, :] + self.lead
        xs = {}
        if dropout_key is not None:
            xs["keys"] = jax.vmap(jax.vmap(lambda i: jax.random.fold_in(dropout_key, i)))(
                jnp.asarray(index_UP)
            )
        if caches is not None:
            xs["caches"] = list(caches)

        # A plain lax.scan over the split state, not nnx.scan: the decoder LM runs this inside the
        # generation loop's own lax loop, where nnx transforms refuse graph nodes of the outer trace.
        graphdef, state_U = nnx.split(self.unit)

        def body(x_BLD, inputs):
            state_u, xs_u = inputs
            unit = nnx.merge(graphdef, state_u)
            auxes, new_caches = [], []
            for j, block in enumerate(unit):
                key = xs_u["keys"][j] if "keys" in xs_u else None
                if caches is not None:
                    x_BLD, aux, cache = block(x_BLD, dropout_key=key, cache=xs_u["caches"][j], **kwargs)
                    new_caches.append(cache)
                elif remat_policy != "none":
                    x_BLD, aux = _remat_call(block, x_BLD, key, remat_policy, kwargs)
                else:
                    x_BLD, aux = block(x_BLD, dropout_key=key, **kwargs)
                auxes.append(aux)
            changed = nnx.state(unit, nnx.Not(nnx.Param))  # selection biases, jitter RNG counts
            return x_BLD, (auxes, new_caches, changed)

        x_BLD, (aux_P, caches_P, changed_U) = jax.lax.scan(body, x_BLD, (state_U, xs))
        if not kwargs.get("deterministic", True):  # only training calls change non-parameter state
            nnx.update(self.unit, changed_U)
        aux = {}
        for u in range(U):
            for j in range(p):
                if aux_P[j] is not None:
                    aux[f"{name}/layer_{self.layer_index(u, j)}"] = jax.tree.map(
                        lambda a, u=u: a[u], aux_P[j]
                    )
        return (x_BLD, aux) if caches is None else (x_BLD, aux, tuple(caches_P))

    def init_caches(self, batch_size: int, max_len: int, dtype) -> tuple[dict[str, jax.Array], ...]:
        """One empty ``{"k", "v"}`` [U, B, M, N, Dh] cache per unit position."""
        out = []
        for block in self.unit:
            attn = block.self_attn
            shape = (self.units, batch_size, max_len, attn.num_kv_heads, attn.head_dim)
            out.append({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
        return tuple(out)


# --- Converting a model's state between the two forms ---------------------------------------------------
def _stacks(model) -> list[tuple[str, int, tuple[int, ...]]]:
    """``(attribute, num_layers, moe_layers)`` of each block stack of an encoder-decoder or decoder LM."""
    cfg = model.cfg
    out = [("decoder", cfg.num_decoder_layers, cfg.moe_layers(cfg.num_decoder_layers))]
    if hasattr(model, "encoder"):
        out.append(("encoder", cfg.num_encoder_layers, cfg.moe_layers(cfg.num_encoder_layers)))
    return out


def _convert(source, target_cls, scan: bool):
    """``source``'s weights in a new model of the other form (built abstractly, then filled)."""
    cfg = dataclasses.replace(source.cfg, scan_layers=scan)
    kwargs = {"bos_id": source.bos_id} if hasattr(source, "bos_id") else {}
    graphdef, target_state = nnx.split(nnx.eval_shape(lambda: target_cls(cfg, **kwargs, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(source))
    for stack, num_layers, moe_layers in _stacks(source):
        lead, period, units = stack_layout(num_layers, moe_layers)
        layers = pure[stack].pop("layers", {})
        if scan and period:
            unit = {
                j: jax.tree.map(
                    lambda *xs: jnp.stack(xs), *[layers[lead + u * period + j] for u in range(units)]
                )
                for j in range(period)
            }
            layers = {i: layers[i] for i in range(lead)}
            pure[stack]["scanned"] = {"unit": unit}
        elif not scan and period:
            unit = pure[stack].pop("scanned")["unit"]
            for u in range(units):
                for j in range(period):
                    layers[lead + u * period + j] = jax.tree.map(lambda a, u=u: a[u], unit[j])
        if layers:
            pure[stack]["layers"] = layers
    nnx.replace_by_pure_dict(target_state, pure)
    return nnx.merge(graphdef, target_state)


def to_scanned(model):
    """The same model with ``scan_layers=True`` (its repeated blocks' weights stacked); outputs are equal."""
    return _convert(model, type(model), scan=True)


def to_unscanned(model):
    """The same model with ``scan_layers=False`` (one block per layer), e.g. for Hugging Face export."""
    return _convert(model, type(model), scan=False)
