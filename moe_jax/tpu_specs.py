"""Per-chip peak numbers of Cloud TPU generations and a roofline step-time estimate.

One table, :data:`SPECS`, every row with the Google Cloud TPU documentation page it was read from (checked
2026-11; the pages are revised now and then, so re-read them before trusting a digit). Used by
:mod:`moe_jax.planner` to turn an ahead-of-time compiled step (FLOPs, HBM bytes, collective bytes per chip)
into a fit check, a step-time estimate and an MFU estimate.

The roofline model (:func:`roofline`) is deliberately simple::

    step_s = max(flops / peak_flops, hbm_bytes / hbm_bw) + ici_bytes / ici_bw

Compute and HBM traffic are assumed to overlap perfectly with each other, and collectives not at all with
either; real steps overlap collectives with compute (XLA's async collectives, latency-hiding scheduler), so
the estimate is pessimistic there, and optimistic everywhere else (peak FLOP/s and bandwidths are never
reached, latency and launch overheads are ignored). Use it to rank strategies and spot the bottleneck, not
as a promise.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """Documented peak numbers of one TPU chip (a JAX device is one chip, megacore included).

    Attributes:
        name: generation as in topology names (``v5p`` in ``v5p:4x4x4``).
        device_kinds: ``jax.Device.device_kind`` strings of this generation.
        peak_bf16_flops: peak dense bf16 FLOP/s per chip.
        hbm_bytes: HBM capacity per chip, in bytes, converted from the unit the page uses (GB or GiB).
        hbm_bw: HBM bandwidth per chip, bytes/s.
        ici_bw_bidirectional: inter-chip interconnect bandwidth per chip, both directions summed, bytes/s.
        source: the documentation page the numbers come from.
        note: how a number was read where the page does not state it directly, or revisions disagree.
    """

    name: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float
    hbm_bytes: float
    hbm_bw: float
    ici_bw_bidirectional: float
    source: str
    note: str = ""

    @property
    def ici_bw(self) -> float:
        """Bytes/s one chip can receive over all its ICI links: half the bidirectional figure."""
        return self.ici_bw_bidirectional / 2


SPECS: dict[str, TpuSpec] = {
    s.name: s
    for s in (
        TpuSpec(
            "v4",
            ("TPU v4",),
            peak_bf16_flops=275e12,
            hbm_bytes=32 * GiB,
            hbm_bw=1200 * GB,
            ici_bw_bidirectional=2 * 1.1e15 / 4096,
            source="https://docs.cloud.google.com/tpu/docs/v4",
            note=(
                "The page gives no per-chip ICI figure; it is derived from its 'all-reduce bandwidth per "
                "Pod' (1.1 PB/s over 4096 chips = 269 GB/s one way, x2 both ways). The same derivation "
                "reproduces the per-chip figures the v5e and v6e pages do state (51.2 TB/s / 256 x 2 = "
                "400 GBps; 102.4 TB/s / 256 x 2 = 800 GBps)."
            ),
        ),
        TpuSpec(
            "v5e",
            ("TPU v5 lite", "TPU v5e"),
            peak_bf16_flops=197e12,
            hbm_bytes=16 * GB,
            hbm_bw=819 * GB,
            ici_bw_bidirectional=400 * GB,
            source="https://docs.cloud.google.com/tpu/docs/v5e",
            note="A later revision of the page lists the HBM bandwidth as 800 GiBps; 819 GBps is kept.",
        ),
        TpuSpec(
            "v5p",
            ("TPU v5", "TPU v5p"),
            peak_bf16_flops=459e12,
            hbm_bytes=95 * GiB,
            hbm_bw=2765 * GB,
            ici_bw_bidirectional=1200 * GB,
            source="https://docs.cloud.google.com/tpu/docs/v5p",
            note="95 GiB is the user-allocatable HBM (96 GiB physical), as the page explains.",
        ),
        TpuSpec(
            "v6e",
            ("TPU v6 lite", "TPU v6e"),
            peak_bf16_flops=918e12,
            hbm_bytes=32 * GB,
            hbm_bw=1600 * GB,
            ici_bw_bidirectional=800 * GB,
            source="https://docs.cloud.google.com/tpu/docs/v6e",
            note="An earlier revision of the page lists 1640 GBps HBM bandwidth; the current 1600 is kept.",
        ),
    )
}


def spec_for(device_kind: str) -> TpuSpec:
    """The spec whose ``device_kinds`` holds ``device_kind`` (as ``jax.Device.device_kind`` spells it).

    Raises:
        KeyError: no row for that chip; the message lists the known ones.
    """
    for spec in SPECS.values():
        if device_kind in spec.device_kinds:
            return spec
    known = ", ".join(f"{s.name} ({'/'.join(s.device_kinds)})" for s in SPECS.values())
    raise KeyError(f"no peak numbers for TPU device kind {device_kind!r}; moe_jax.tpu_specs knows {known}")


def roofline(flops: float, hbm_bytes: float, ici_bytes: float, spec: TpuSpec) -> dict[str, float | str]:
    """Step-time estimate of one chip's program (see the module docstring for the model).

    Args:
        flops: FLOPs one chip executes per step.
        hbm_bytes: bytes one chip reads and writes in HBM per step.
        ici_bytes: bytes one chip receives over ICI per step.
        spec: the chip.

    Returns:
        ``compute_s``, ``memory_s``, ``ici_s``, ``step_s`` and ``bound`` (``compute``, ``memory`` or ``ici``:
        the largest of the three terms).
    """
    compute_s = flops / spec.peak_bf16_flops
    memory_s = hbm_bytes / spec.hbm_bw
    ici_s = ici_bytes / spec.ici_bw
    terms = {"compute": compute_s, "memory": memory_s, "ici": ici_s}
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "ici_s": ici_s,
        "step_s": max(compute_s, memory_s) + ici_s,
        "bound": max(terms, key=terms.get),
    }


def mfu(model_flops_per_chip: float, step_s: float, spec: TpuSpec) -> float:
    """Model FLOPs utilisation: useful FLOPs per chip over what the chip could do in ``step_s``."""
    return model_flops_per_chip / (step_s * spec.peak_bf16_flops)
