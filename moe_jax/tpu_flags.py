"""XLA:TPU compiler flags the project sets for TPU programs (real runs and ahead-of-time plans).

Without them XLA:TPU decomposes an all-gather into an all-reduce of a zero-padded whole copy (dynamic-update-
slice into zeros, then all-reduce) for FSDP-style 1-D sharding over a multi-dimensional torus: twice the bytes
of an all-gather, and the gathered weights stay live from the forward into the backward pass instead of being
re-gathered (for a v5p 4x4x4 the whole of a Mixtral's bf16 weights). Asynchronous collective fusion with
all-gather fusion lets the compiler keep real, overlapped all-gathers; ``prefer_async_allgather_to_allreduce``
then stops the decomposition (it only applies with asynchronous all-gathers enabled). These are the flags
TPU training stacks (MaxText's v5p settings among them) pass through ``LIBTPU_INIT_ARGS``.

libtpu reads ``LIBTPU_INIT_ARGS`` once, when it is loaded: :func:`apply` must run before the first TPU
backend or topology is created in the process. Flags the user already set there are kept (theirs win);
``MOE_JAX_TPU_FLAGS=0`` leaves ``LIBTPU_INIT_ARGS`` untouched.
"""

from __future__ import annotations

import os

FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_prefer_async_allgather_to_allreduce=true",
)

ENV = "LIBTPU_INIT_ARGS"


def apply(environ=os.environ) -> str:
    """Adds :data:`FLAGS` to ``LIBTPU_INIT_ARGS`` (a flag already named there keeps the user's value).

    Returns:
        The resulting ``LIBTPU_INIT_ARGS``.
    """
    current = environ.get(ENV, "")
    if environ.get("MOE_JAX_TPU_FLAGS", "1") == "0":
        return current
    named = {part.split("=", 1)[0] for part in current.split()}
    added = [flag for flag in FLAGS if flag.split("=", 1)[0] not in named]
    environ[ENV] = " ".join(part for part in [current.strip(), *added] if part)
    return environ[ENV]
