"""The ragged exchange of expert parallelism: send each device exactly the rows routed to its experts.

Inside ``shard_map`` over the expert mesh axes (n shards, E_l = E / n experts each). A device holds M
assignment rows sorted by global expert, so the rows for destination d are one contiguous run. The plan:

1. Sizes first: every device all-gathers the ``[n, E_l]`` per-expert row counts of every other device
   (n·E int32, a few hundred bytes), so each knows the whole ``counts[src, dst, e]`` table.
2. Offsets from the table, no further collective: where my run for ``d`` starts in my buffer, where it lands
   in ``d``'s receive buffer (after the runs of the sources before me), and what I receive from each source.
3. One ``jax.lax.ragged_all_to_all`` each way (rows forward, then expert outputs back where they came from).

The receive buffer holds n·M rows (a dropless worst case: every shard sends every row to me); only the
received rows are moved. XLA:CPU has no ragged-all-to-all, so on CPU :func:`ragged_all_to_all` lowers to an
exact emulation (all-gather every shard's rows and pick them out; n times the bytes): the offsets and the
permutations around it are then testable on simulated devices, while TPU and GPU lowerings get the real
collective (``tests/test_ep_transport.py`` compiles it for a TPU topology).

Shape letters: M local assignment rows, R receive-buffer rows (n·M), D features, n expert shards.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExchangePlan(NamedTuple):
    """Offsets and sizes of one device's two ragged exchanges (all int32).

    Attributes:
        send_offsets_n: start of my run for each destination in my expert-sorted rows.
        send_sizes_n: rows I send to each destination.
        remote_offsets_n: where my run starts in each destination's receive buffer.
        recv_offsets_n: where each source's run starts in my receive buffer.
        recv_sizes_n: rows I receive from each source.
        source_offsets_n: where each source's run for me starts in that source's sorted rows (the return
            exchange writes my outputs back there).
        recv_counts_nE: rows I receive from each source for each of my local experts.
    """

    send_offsets_n: jax.Array
    send_sizes_n: jax.Array
    remote_offsets_n: jax.Array
    recv_offsets_n: jax.Array
    recv_sizes_n: jax.Array
    source_offsets_n: jax.Array
    recv_counts_nE: jax.Array


def exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def plan(group_sizes_E: jax.Array, axis_name) -> ExchangePlan:
    """The exchange plan from this device's per-expert row counts (one tiny all-gather).

    Args:
        group_sizes_E: ``[E]`` rows this device holds for each global expert (sorted by expert).
        axis_name: the expert mesh axis (or tuple of axes) the experts are sharded over.
    """
    n = jax.lax.psum(1, axis_name)
    me = jax.lax.axis_index(axis_name)
    counts_nE = group_sizes_E.reshape(n, -1)  # [dst, E_l]
    table_nnE = jax.lax.all_gather(counts_nE, axis_name)  # [src, dst, E_l]
    sent_nn = table_nnE.sum(-1)  # [src, dst] rows
    send_sizes_n = sent_nn[me]
    recv_sizes_n = sent_nn[:, me]
    # In each destination's buffer the sources' runs follow one another in source order.
    before_me_n = jnp.arange(n) < me
    remote_offsets_n = jnp.sum(jnp.where(before_me_n[:, None], sent_nn, 0), axis=0)
    # A source's runs are in destination order: its run for me starts after its runs for d < me.
    source_offsets_n = jnp.sum(jnp.where(before_me_n[None, :], sent_nn, 0), axis=1)
    return ExchangePlan(
        send_offsets_n=exclusive_cumsum(send_sizes_n),
        send_sizes_n=send_sizes_n,
        remote_offsets_n=remote_offsets_n,
        recv_offsets_n=exclusive_cumsum(recv_sizes_n),
        recv_sizes_n=recv_sizes_n,
        source_offsets_n=source_offsets_n,
        recv_counts_nE=table_nnE[:, me],
    )


def received_experts(plan: ExchangePlan, num_rows: int) -> jax.Array:
    """``[num_rows]`` local expert of each receive-buffer row; rows past what arrived get ``E_l``.

    The buffer is source-major and, within a source's run, expert-major (each source sorted its rows).
    """
    n, E_l = plan.recv_counts_nE.shape
    expert_of_run = jnp.tile(jnp.arange(E_l, dtype=jnp.int32), n)
    counts = plan.recv_counts_nE.reshape(-1)
    expert_R = jnp.repeat(expert_of_run, counts, total_repeat_length=num_rows)
    arrived_R = jnp.arange(num_rows) < counts.sum()
    return jnp.where(arrived_R, expert_R, E_l)


def forward(x_MD: jax.Array, plan: ExchangePlan, axis_name) -> jax.Array:
    """Sends my expert-sorted rows to their experts' shards; returns the ``[n·M, D]`` receive buffer."""
    n = jax.lax.psum(1, axis_name)
    buffer_RD = jnp.zeros((n * x_MD.shape[0], x_MD.shape[1]), x_MD.dtype)
    return ragged_all_to_all(
        x_MD,
        buffer_RD,
        plan.send_offsets_n,
        plan.send_sizes_n,
        plan.remote_offsets_n,
        plan.recv_sizes_n,
        axis_name=axis_name,
    )


def backward(y_RD: jax.Array, plan: ExchangePlan, num_rows: int, axis_name) -> jax.Array:
    """Returns received rows' outputs to their sources, into my ``[num_rows, D]`` expert-sorted order."""
    return ragged_all_to_all(
        y_RD,
        jnp.zeros((num_rows, y_RD.shape[1]), y_RD.dtype),
        plan.recv_offsets_n,
        plan.recv_sizes_n,
        plan.source_offsets_n,
        plan.send_sizes_n,
        axis_name=axis_name,
    )


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all``; on XLA:CPU (which lacks it) an exact all-gather emulation."""
    # The collective's result takes the output buffer's type: a fresh zeros buffer would be typed as the same
    # on every device, though what arrives differs per device.
    missing = tuple(sorted(_varying(operand) - _varying(output)))
    if missing:
        output = jax.lax.pcast(output, missing, to="varying")
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)

    def real(*a):
        return jax.lax.ragged_all_to_all(*a, axis_name=axis_name)

    def emulated(*a):
        return _emulated_ragged_all_to_all(*a, axis_name=axis_name)

    return jax.lax.platform_dependent(*args, cpu=emulated, default=real)


def _varying(x) -> set:
    return set(jax.typeof(x).manual_axis_type.varying)


def _emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    del recv_sizes  # implied by the senders' sizes; the real collective takes it for its own bookkeeping
    me = jax.lax.axis_index(axis_name)
    operand_nMD = jax.lax.all_gather(operand, axis_name)
    start_n = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    size_n = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    source_start_n = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    row_R = jnp.arange(output.shape[0])
    inside_nR = (row_R[None] >= start_n[:, None]) & (row_R[None] < (start_n + size_n)[:, None])
    source_R = jnp.argmax(inside_nR, axis=0)
    index_R = jnp.clip(source_start_n[source_R] + row_R - start_n[source_R], 0, operand.shape[0] - 1)
    rows_RD = operand_nMD[source_R, index_R]
    return jnp.where(jnp.any(inside_nR, axis=0)[:, None], rows_RD, output)
