#!/usr/bin/env bash
# One prepared run for an accelerator host (only jax/flax/numpy needed): correctness of every grouped backend
# inside the layer first, then the layer benchmark on the large presets. Results go to ${OUT:-runs/gpu}.
# Each step has its own timeout so one slow preset cannot eat the others' time.
set -u
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$out/env.txt"
timeout 75 python benchmarks/check_backends.py 2>&1 | tee "$out/check_backends.txt"
for preset in mixtral_like fine_grained switch_like; do
  timeout 120 python benchmarks/bench_moe_layer.py --preset "$preset" --only einsum,indices,auto \
    --json "$out/$preset.json" 2>&1 | grep -v "^WARNING" | tee "$out/$preset.txt"
done
timeout 60 python benchmarks/bench_gmm.py --backends mosaic_gpu --repeats 5 2>&1 | tee "$out/bench_gmm.txt"
for preset in fine_grained switch_like mixtral_like; do
  timeout 75 python benchmarks/profile_dropless.py --preset "$preset" 2>&1 | grep -v "^WARNING" | tee "$out/profile_$preset.txt"
done
