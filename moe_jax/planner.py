"""Plans a TPU pod from a CPU host: the real train step compiled ahead of time for a TPU topology.

``jax.experimental.topologies.get_topology_desc`` describes a pod (``v5p:4x4x4`` is 64 chips) without any
TPU attached; a mesh over its devices, the train state as ``ShapeDtypeStruct`` s with ``NamedSharding`` s
and ``jax.jit(step).lower(...).compile()`` give the program XLA:TPU would run on each chip. From it
:func:`plan_strategy` reads, per chip: memory (``memory_analysis``), FLOPs and HBM bytes (``cost_analysis``)
and every collective of the HLO (:mod:`moe_jax.hlo_stats`), and adds a roofline step time and an MFU
estimate (:mod:`moe_jax.tpu_specs`). Nothing is allocated or run, so a model far larger than the host's
memory costs only compile time (a few minutes per strategy on 2 cores for ``translation:xl``, 27 B params).

The TPU compiler ships in ``libtpu`` (``pip install "jax[tpu]==<installed jax version>"``, or the
``moe_jax[tpu-plan]`` extra); :func:`load_topology` says so in one line when it is missing.

ICI bytes: a collective's HLO result size is not what crosses the links. :func:`ici_bytes` converts each
collective to the bytes one chip *receives* with a bandwidth-optimal algorithm over a group of ``n`` chips:
all-gather ``(n-1)/n·R``, all-to-all ``(n-1)/n·R``, all-reduce ``2(n-1)/n·R`` (reduce-scatter then
all-gather), reduce-scatter ``(n-1)·R`` (its result is one shard), collective-permute ``R``,
ragged-all-to-all ``(n-1)/n·min(R, operand)``: what moves depends on the routing, so this is the balanced
case. Forward the result is a receive buffer n times what a chip sends (the dropless worst case) and a
balanced routing fills 1/n of it; on the way back the result is the sender's rows. Which links a
group spans (one torus axis or several) is ignored: the roofline divides by the chip's whole receive
bandwidth, which a collective over one mesh axis does not get, so treat the ICI term as a lower bound.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from moe_jax import hlo_stats, sharding, tpu_flags, tpu_specs
from moe_jax.models import ModelConfig, Seq2SeqTransformer
from moe_jax.train import optim, step

# Topology names that jax accepts, for error messages.
EXAMPLE_TOPOLOGIES = ("v5p:4x4x4", "v5e:16x16", "v4:4x4x8", "v6e:8x8")


class PlannerError(Exception):
    """A planning request that cannot be met; the message is one line meant for the user."""


def install_hint() -> str:
    """The pip command that brings the TPU compiler matching the installed jax."""
    return f'pip install "jax[tpu]=={jax.__version__}"'


def _libtpu_path() -> str | None:
    """Where jax would load libtpu from (the ``TPU_LIBRARY_PATH`` file, else the ``libtpu`` package)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return path
    found = importlib.util.find_spec("libtpu")
    return found.origin if found is not None else None


@contextlib.contextmanager
def _quiet_stderr():
    """Sends file descriptor 2 to /dev/null for the duration (C++ writes bypass ``sys.stderr``).

    libtpu prints warnings when it starts on a host that is not a Cloud TPU VM (no accelerator type, no
    worker hostnames). They are expected and harmless for compiling; when loading does fail, the exception
    jax raises carries the reason.
    """
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_topology(name: str):
    """Describes the TPU pod ``name`` (e.g. ``v5p:4x4x4``); returns ``(topology, spec)``.

    Raises:
        PlannerError: libtpu is missing (the message is the install command), jax does not know the name,
            or :mod:`moe_jax.tpu_specs` has no peak numbers for its chip.
    """
    if _libtpu_path() is None:
        raise PlannerError(
            f"--topology needs the TPU compiler (libtpu), which is not installed: {install_hint()}  "
            "(or pip install -e '.[tpu-plan]')"
        )
    # libtpu takes /tmp/libtpu_lockfile so two processes never drive the same chips. Compiling opens no
    # chip, and on a shared host any JAX process with libtpu installed may hold that lock for its lifetime.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    tpu_flags.apply()  # plan what a TPU run compiles (no effect once libtpu is loaded in this process)
    from jax.experimental import topologies

    with _quiet_stderr():
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
        except Exception as e:  # libtpu raises several types; all mean the same to the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PlannerError(
                f"--topology={name}: {first}; names look like {', '.join(EXAMPLE_TOPOLOGIES)}"
            ) from None
    try:
        spec = tpu_specs.spec_for(topo.devices[0].device_kind)
    except KeyError as e:
        raise PlannerError(f"--topology={name}: {e.args[0]}") from None
    return topo, spec


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def default_pod_mesh(strategy: str, config, chips: int) -> dict[str, int]:
    """The mesh a strategy gets on ``chips`` chips when ``--mesh`` does not say otherwise.

    Each preset keeps its axes, sized for the model: ``expert`` is the largest divisor of the chip count
    that divides the number of experts (each chip holds whole experts, none replicated within the axis),
    ``tensor`` (``ep_tp``) is the largest of 4, 2, 1 dividing the heads and the chips (tensor parallelism
    pays a collective per layer, so it stays small and within neighbouring chips), and the remaining axis
    (``data`` or ``fsdp``) takes the rest. ``ep_fsdp`` keeps at least 2 chips on ``fsdp`` (with as many
    experts as chips it would otherwise be ``ep``).
    """
    experts = int(config.model.moe.num_experts)
    heads = int(config.model.num_heads)
    if strategy == "dp":
        return {"data": chips}
    if strategy == "fsdp":
        return {"fsdp": chips}
    tensor = next(t for t in (4, 2, 1) if heads % t == 0 and chips % t == 0) if strategy == "ep_tp" else 1
    min_fsdp = 2 if strategy == "ep_fsdp" and chips % 2 == 0 else 1
    expert = next(d for d in _divisors_desc(chips // (tensor * min_fsdp)) if experts % d == 0)
    rest = chips // (tensor * expert)
    if strategy == "ep":
        return {"data": rest, "expert": expert}
    if strategy == "ep_fsdp":
        return {"fsdp": rest, "expert": expert}
    if strategy == "ep_tp":
        return {"data": rest, "expert": expert, "tensor": tensor}
    raise PlannerError(
        f"strategy {strategy!r} has no default pod mesh; give one with --mesh={strategy}:AXIS=N,..."
    )


# --- ICI traffic --------------------------------------------------------------------------------------
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_RESULT = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(hlo_stats.KINDS) + r")(-start)?\(")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def _arrays(text: str) -> list[int]:
    """Bytes of every array shape in ``text`` (dtypes without a known size are skipped)."""
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        if dtype in hlo_stats._DTYPE_BYTES:  # one dtype table for the project
            sizes.append(
                math.prod(int(d) for d in filter(None, dims.split(","))) * hlo_stats._DTYPE_BYTES[dtype]
            )
    return sizes


def group_size(line: str, num_devices: int) -> int | None:
    """Chips per replica group of an HLO collective line (``None`` when the format is not recognised)."""
    m = _MESH_GROUPS.search(line)  # XLA:TPU: mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
    if m:
        sizes = {
            k.strip("' "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)
        }
        axes = [a.strip("' ") for a in m.group(2).split(",") if a.strip("' ")]
        return math.prod(sizes[a] for a in axes) if axes else num_devices
    m = _LIST_GROUPS.search(line)  # {{0,1,2,3},{4,5,6,7}}
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    m = _IOTA_GROUPS.search(line)  # [2,4]<=[8]: 2 groups of 4
    if m:
        return int(m.group(2))
    if "replica_groups={}" in line:
        return num_devices
    return None


def collective_ici_bytes(line: str, num_devices: int) -> int:
    """Bytes one chip receives for one collective line (see the module docstring for the factors)."""
    m = _RESULT.search(line)
    if not m:
        return 0
    kind, started = m.group(2), bool(m.group(3))
    arrays = _arrays(m.group(1))
    if started and kind != "all-reduce":
        # Async starts return (operands, results, u32 contexts): drop the contexts, keep the results.
        arrays = [b for b in arrays if b > 4] if len(arrays) > 1 else arrays
    n = group_size(line, num_devices) or 2
    result = sum(arrays)
    if started and kind == "all-gather":
        result = result * n // (n + 1)  # operand R/n plus result R
    elif started and kind == "collective-permute":
        result //= 2  # operand plus result, same size
    factor = {
        "all-gather": (n - 1) / n,
        "all-to-all": (n - 1) / n,
        "all-reduce": 2 * (n - 1) / n,
        "reduce-scatter": n - 1,
        "collective-permute": 1.0,
        "ragged-all-to-all": (n - 1) / n,
    }[kind]
    return int(result * factor)


def ici_bytes(hlo_text: str, num_devices: int) -> int:
    """Bytes one chip receives over ICI per execution of the program."""
    return sum(ici_bytes_by_kind(hlo_text, num_devices).values())


def ici_bytes_by_kind(hlo_text: str, num_devices: int) -> dict[str, int]:
    """:func:`ici_bytes` split by collective kind."""
    out: dict[str, int] = {}
    value_bytes = None
    for c in hlo_stats.collectives(hlo_text):
        received = collective_ici_bytes(c.line, num_devices)
        if c.kind == "ragged-all-to-all":
            # The line names its operand without a shape: look the operand's definition up.
            value_bytes = _value_bytes(hlo_text) if value_bytes is None else value_bytes
            operand = _FIRST_OPERAND.search(c.line)
            if operand and operand.group(1) in value_bytes and c.result_bytes:
                received = received * min(value_bytes[operand.group(1)], c.result_bytes) // c.result_bytes
        out[c.kind] = out.get(c.kind, 0) + received
    return out


_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(\w+\[[\d,]*\])")
_FIRST_OPERAND = re.compile(r"ragged-all-to-all\((%[\w.\-]+)")


def _value_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of every array value the HLO text defines, by name."""
    out = {}
    for line in hlo_text.splitlines():
        m = _DEFINITION.match(line)
        if m:
            out[m.group(1)] = hlo_stats._shape_bytes(m.group(2))
    return out


LM_TASK = "language_modeling"
PLANNED_TASKS = ("translation", "summarization", LM_TASK)


def check_task(config) -> None:
    """Raises ``ValueError`` unless the planner knows the config's task (the text tasks)."""
    if config.get("task") not in PLANNED_TASKS:
        raise ValueError(
            f"config.task={config.get('task')!r}: the planner plans {', '.join(PLANNED_TASKS)} configs"
        )


def build_model(config, vocab_size: int):
    """The config's model: the decoder LM (``language_modeling``) or the encoder-decoder (BOS id 2, seed 0:
    shapes are what matter here)."""
    check_task(config)
    if config.task == LM_TASK:
        from moe_jax.tasks.lm import build_decoder

        return build_decoder(config, vocab_size)
    cfg = ModelConfig.from_mapping(config.model.to_dict(), vocab_size=vocab_size)
    return Seq2SeqTransformer(cfg, bos_id=2, rngs=nnx.Rngs(params=0))


def token_lengths(config) -> tuple[int, int]:
    """``(input_len, target_len)`` of a training row; the LM has only targets (its inputs are shifted)."""
    if config.task == LM_TASK:
        return 0, int(config.data.seq_len)
    return int(config.data.max_input_len), int(config.data.max_target_len)


def batch_layout(config) -> dict[str, tuple[int, type]]:
    """``{key: (row length, dtype)}`` of the training batch the task's train step reads."""
    if config.task == LM_TASK:
        L = int(config.data.seq_len)
        return {
            "inputs": (L, np.int32),
            "targets": (L, np.int32),
            "segment_ids": (L, np.int32),
            "positions": (L, np.int32),
            "token_weight": (L, np.float32),
        }
    Li, Lt = token_lengths(config)
    return {"inputs": (Li, np.int32), "targets": (Lt, np.int32)}


def random_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A training batch of random tokens (one document per row for the LM)."""
    B, vocab = int(config.train.batch_size), int(config.data.vocab_size)
    out = {}
    for key, (length, dtype) in batch_layout(config).items():
        if key in ("inputs", "targets"):
            out[key] = rng.integers(4, vocab, size=(B, length), dtype=np.int32)
        elif key == "segment_ids":
            out[key] = np.ones((B, length), np.int32)
        elif key == "positions":
            out[key] = np.broadcast_to(np.arange(length, dtype=np.int32), (B, length)).copy()
        else:
            out[key] = np.ones((B, length), dtype)
    return out


def loss_sums(config):
    """The task's training forward (:meth:`moe_jax.tasks.base.Task.loss_sums`)."""
    from moe_jax.tasks import get_task

    check_task(config)
    return get_task(config).loss_sums


# --- Model FLOPs ----------------------------------------------------------------------------------------
def model_flops(config, params: nnx.State) -> dict[str, float]:
    """Analytic FLOPs of one training step of a text model: 3 × forward (backward = 2 × forward).

    Forward = 2 × (active parameters × the tokens they touch) + attention scores (QKᵀ and AV,
    ``4·B·Lq·Lk·H·head_dim`` per attention). Expert weights count ``top_k / num_experts`` of their size
    (what one token uses; capacity padding is overhead, not model FLOPs); encoder weights see the input
    tokens, decoder weights the target tokens, cross-attention keys/values the input tokens; the tied
    embedding counts once, as the output projection; norms and lookups are free. The decoder LM has only
    the target side (every weight sees ``seq_len`` tokens a row). Attention counts the whole L×L score
    matrix, causal or not (the PaLM-paper MFU convention).

    Returns:
        ``total`` (global FLOPs per step), ``params`` and ``active_params`` (per token).
    """
    m = config.model
    B = int(config.train.batch_size)
    Li, Lt = token_lengths(config)
    tokens_in, tokens_out = B * Li, B * Lt
    E, K = int(m.moe.num_experts), int(m.moe.top_k)
    total_params = active_params = 0.0
    forward = 0.0
    for path, variable in nnx.to_flat_state(params):
        keys = [str(getattr(k, "key", k)) for k in path]
        shape = variable.get_value().shape
        size = float(math.prod(shape))
        total_params += size
        axes = variable.get_metadata().get("out_sharding") or ()
        if len(shape) - ("layers" in axes) < 2 or keys[-1] == "pos":
            continue  # norm scales, biases, learned positions (stacked or not): no matmul
        used = size * K / E if "expert" in axes else size
        active_params += used
        if keys[0] == "embedder":
            tokens = tokens_out if m.tie_embeddings else 0  # tied table: the output projection
        elif (
            keys[0] == "decoder"
            and "cross_attn" in keys
            and keys[-1] in ("w_k", "w_v")
            or keys[0] == "encoder"
        ):
            tokens = tokens_in
        else:
            tokens = tokens_out
        forward += 2 * used * tokens
    d_attn = int(m.num_heads) * int(m.head_dim or int(m.d_model) // int(m.num_heads))
    n_enc = int(m.num_encoder_layers) if config.task != LM_TASK else 0
    n_dec = int(m.num_decoder_layers)
    forward += 4 * B * d_attn * (n_enc * Li * Li + n_dec * (Lt * Lt + Lt * Li))
    return {"total": 3 * forward, "params": total_params, "active_params": active_params}


# --- One strategy ------------------------------------------------------------------------------------
def abstract_like(state, shardings):
    """The state as ``ShapeDtypeStruct`` s placed by ``shardings`` (compile without allocating it)."""
    return jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        state,
        shardings,
        is_leaf=lambda v: isinstance(v, nnx.Variable | jax.sharding.NamedSharding),
    )


def _bytes_per_chip(abstract_state) -> int:
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


# XLA:TPU's out-of-memory messages: "... required for HLO temporaries (36.10G) exceeds available HBM
# (15.75G)" or "Used 120.5G of 95.74G hbm".
_OOM_SIZE = re.compile(r"(?:required[^(]*\(|Used )([\d.]+)([KMGT]?)")


def _parse_oom(message: str) -> int | None:
    """Bytes the compiler wanted, from an XLA:TPU out-of-HBM message (``None``: not such a message)."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m = _OOM_SIZE.search(message)
    if not m:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(m.group(1)) * scale[m.group(2)])


def plan_strategy(
    config,
    strategy: str,
    mesh_shape: Mapping[str, int],
    topology,
    spec: tpu_specs.TpuSpec,
    *,
    devices: Sequence | None = None,
) -> dict:
    """Compiles the trainer's train step for ``strategy`` on the pod and returns one row of estimates.

    Args:
        config: a text config (``configs/translation.py``, ``configs/lm.py`` and friends).
        strategy: a preset of :data:`moe_jax.sharding.PRESETS`.
        mesh_shape: sizes per mesh axis; one may be -1.
        topology: from :func:`load_topology`.
        spec: the chip's peak numbers.
        devices: plan for these chips of the topology only (default all of them).

    Returns:
        A JSON-ready dict (memory, FLOPs, bytes, collectives, roofline, MFU, fit). When the compiler runs
        out of HBM the row says ``fits: False`` with the bytes it asked for, instead of raising.

    Raises:
        ValueError: the mesh does not divide the chip count, a parameter or the batch does not divide its
            mesh axes (the message names the sizes).
    """
    devices = list(topology.devices if devices is None else devices)
    try:
        mesh = sharding.make_mesh(mesh_shape, devices=devices)
    except ValueError as e:
        raise ValueError(f"{strategy}: {e} (the pod has {len(devices)} chips)") from None
    rules = sharding.preset_rules(strategy)
    vocab = int(config.data.vocab_size)
    B = int(config.train.batch_size)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_train_steps))

        def init():
            model = build_model(config, vocab)
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        model, optimizer = nnx.eval_shape(init)
        graphdef, state = nnx.split((model, optimizer))
        state_sh = sharding.state_shardings(state, mesh, rules)
        abstract_state = abstract_like(state, state_sh)
        batch_spec = sharding.logical_to_spec(("act_batch",), rules, mesh.axis_names)
        batch_sh = jax.sharding.NamedSharding(mesh, batch_spec)
        batch_ways = math.prod(
            dict(zip(mesh.axis_names, mesh.devices.shape))[a]
            for entry in batch_spec
            for a in ((entry,) if isinstance(entry, str) else entry or ())
        )
        if B % batch_ways:
            raise ValueError(
                f"{strategy}: the global batch of {B} is not divisible by its {batch_ways}-way batch "
                f"sharding over {dict(zip(mesh.axis_names, mesh.devices.shape))}; change train.batch_size"
            )
        batch = {
            key: jax.ShapeDtypeStruct((B, length), dtype, sharding=batch_sh)
            for key, (length, dtype) in batch_layout(config).items()
        }
        train_fn = step.jit_train_step(
            graphdef,
            state_sh,
            batch_sh,
            loss_sums=loss_sums(config),
            schedule=schedule,
            seed=int(config.seed),
            lb_weight=float(config.loss.lb_weight),
            z_weight=float(config.loss.z_weight),
        )
        try:
            lowered = train_fn.lower(abstract_state, batch)
        except NotImplementedError as e:
            if "Mosaic kernels cannot be automatically partitioned" not in str(e):
                raise
            # The megablox grouped matmuls are Pallas/Mosaic kernels: GSPMD cannot split them over chips.
            raise ValueError(
                f"{strategy}: the megablox kernels (model.moe.grouped_backend) cannot be partitioned by "
                "GSPMD over several chips; run them inside shard_map (model.moe.expert_parallel='shard_map', "
                "model.moe.ep_transport='ragged' or 'ring'), or plan with grouped_backend='core'"
            ) from None
    flops_model = model_flops(config, nnx.state(model, nnx.Param))
    chips = len(devices)
    row = {
        "strategy": strategy,
        "mesh": {k: v for k, v in zip(mesh.axis_names, mesh.devices.shape) if v > 1} or {"data": 1},
        "chips": chips,
        "params": flops_model["params"],
        "active_params": flops_model["active_params"],
        "state_bytes_per_chip": _bytes_per_chip(abstract_state),
        "model_flops_per_chip": flops_model["total"] / chips,
        "hbm_bytes": spec.hbm_bytes,
    }
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError's home moved between jax versions
        wanted = _parse_oom(str(e))
        if wanted is None:
            raise
        message = next((ln for ln in str(e).splitlines() if "memory" in ln), str(e)).strip()
        return {
            **row,
            "fits": False,
            "peak_bytes_per_chip": wanted,
            "error": "compiler: out of HBM",
            "compiler_message": message[:300],
        }
    peak = hlo_stats.peak_memory_bytes(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, Sequence) else cost
    hlo = compiled.as_text()
    flops, hbm_traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    received = ici_bytes(hlo, chips)
    return scanned_floor(
        {
            **row,
            "fits": peak <= spec.hbm_bytes,
            "peak_bytes_per_chip": int(peak),
            "temp_bytes_per_chip": int(compiled.memory_analysis().temp_size_in_bytes),
            "flops_per_chip": flops,
            "hbm_bytes_accessed_per_chip": hbm_traffic,
            "collectives": hlo_stats.summary(hlo),
            "ici_bytes_per_chip": received,
            # Pallas/Mosaic kernels in the program (the megablox grouped matmuls when that backend is chosen).
            "tpu_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
            "loop_body_counted_once": bool(config.model.get("scan_layers")),
        },
        spec,
    )


def scanned_floor(row: dict, spec: tpu_specs.TpuSpec) -> dict:
    """Adds the roofline estimate and MFU to a compiled row.

    XLA's cost analysis and the HLO text hold a while loop's body once, whatever its trip count, so for
    scanned layers (``loop_body_counted_once``) the FLOPs, HBM bytes, collectives and ICI bytes of the
    compiled program cover one repeating unit, not all of them. Their compute term then uses the analytic
    model FLOPs where those are larger (a floor, not the compiled count), and the HBM and ICI terms stay
    lower bounds (the report marks them ``≥``).
    """
    flops = row["flops_per_chip"]
    if row.get("loop_body_counted_once"):
        flops = max(flops, row["model_flops_per_chip"])
    estimate = tpu_specs.roofline(flops, row["hbm_bytes_accessed_per_chip"], row["ici_bytes_per_chip"], spec)
    return {**row, **estimate, "mfu": tpu_specs.mfu(row["model_flops_per_chip"], estimate["step_s"], spec)}
