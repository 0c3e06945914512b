"""Collectives of a compiled program, counted and sized from its HLO text.

``collectives(compiled.as_text())`` lists every (ragged) all-to-all / all-gather / all-reduce /
reduce-scatter / collective-permute with the bytes of its result on one device. Used by the
expert-parallelism guards (the ``ep`` step must exchange tokens with all-to-all, never all-gather
expert weights) and by the sharding comparison tools.

XLA:TPU emits a reduce-scatter as a fusion computation named ``all-reduce-scatter``: an all-reduce of the
whole operand whose result is sliced inside the fusion, so only the shard leaves it and the backend runs it as
one reduce-scatter. Such an all-reduce is counted as the reduce-scatter it is, sized by the fusion's output.

With asynchronous collective fusion over several steps (``moe_jax.tpu_flags``) XLA:TPU spreads one collective
over the compute fusions it overlaps: each holds a copy of the op with the same ``channel_id`` and
``chain_id``. Those copies are one collective and are counted once.
"""

from __future__ import annotations

import collections
import dataclasses
import re

KINDS = (
    "ragged-all-to-all",
    "all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
)

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
# "%name = f32[8,16]{1,0} all-to-all(" or a tuple result "(f32[..], f32[..]) all-to-all("
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
# "%all-reduce-scatter.3 (input: f32[1024,2048]) -> f32[256,2048] {": the header of such a fusion computation.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*(.*?)\s*\{\s*$")
_STEP_OF = re.compile(r'channel_id=(\d+).*chain_id="(\d+)"')
_REDUCE_SCATTER_FUSION = re.compile(r"^all-reduce-scatter(\.\d+)?$")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    result_bytes: int
    line: str


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the (optimized) HLO module text, with its per-device result bytes."""
    found = []
    fusion_output = None  # the output shape text while inside an ``all-reduce-scatter`` fusion computation
    steps_seen = set()
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            fusion_output = header.group(2) if _REDUCE_SCATTER_FUSION.match(header.group(1)) else None
            continue
        m = _OP.search(line)
        if not m:
            continue
        step = _STEP_OF.search(line)
        if step:
            key = (m.group(2), step.groups())
            if key in steps_seen:
                continue
            steps_seen.add(key)
        if fusion_output is not None and m.group(2) == "all-reduce":
            # Rewritten as the reduce-scatter line it stands for, so the group and byte parsers read it alike.
            line = line[: m.start(1)] + fusion_output + " reduce-scatter(" + line[m.end() :]
            found.append(Collective("reduce-scatter", _shape_bytes(fusion_output), line.strip()))
            continue
        found.append(Collective(m.group(2), _shape_bytes(m.group(1)), line.strip()))
    return found


def summary(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": total result bytes per device}}`` for the kinds present."""
    table: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for c in collectives(hlo_text):
        table[c.kind]["count"] += 1
        table[c.kind]["bytes"] += c.result_bytes
    return dict(table)


def peak_memory_bytes(compiled) -> int:
    """Device memory a compiled program needs: arguments + outputs + temporaries − donated (aliased) bytes."""
    mem = compiled.memory_analysis()
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
