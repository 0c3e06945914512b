"""One strategy of an LM config compiled for a TPU slice: its memory and collectives (planner row).

The quick way to look at what XLA:TPU does with a sharding on a reduced model (fewer layers, shorter rows)
before a full ``experiments/compare_sharding.py`` plan; prints the planner's row fields.

    python experiments/probe_fsdp_tpu.py TOPOLOGY STRATEGY "{'fsdp': 64}" [config.field=value ...]

``--config`` is ``configs/lm.py:mixtral_8x7b`` unless ``MOE_JAX_PROBE_CONFIG`` names another.
"""

import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import compare_sharding  # noqa: E402
from moe_jax import planner  # noqa: E402


def main(argv) -> int:
    topology_name, strategy, mesh = argv[0], argv[1], ast.literal_eval(argv[2])
    config = compare_sharding.load_config(
        os.environ.get("MOE_JAX_PROBE_CONFIG", "configs/lm.py:mixtral_8x7b"), argv[3:]
    )
    topology, spec = planner.load_topology(topology_name)
    start = time.time()
    row = planner.plan_strategy(config, strategy, mesh, topology, spec)
    print("compile", time.time() - start)
    for key in ("fits", "peak_bytes_per_chip", "temp_bytes_per_chip", "state_bytes_per_chip"):
        print(key, row.get(key))
    for key in ("ici_bytes_per_chip", "collectives", "error", "compiler_message"):
        print(key, row.get(key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
