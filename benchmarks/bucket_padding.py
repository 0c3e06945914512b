"""Padding of length-bucketed speech batches against random batches padded to ``max_frames``.

Reads the speech config's train split (prepared on first use), plans a few epochs with
``moe_jax.data.bucketing.epoch_batches`` and prints, per epoch, the mean padded frames per row, the fraction
of padded frames that are real and the batches per bucket::

    python benchmarks/bucket_padding.py [--config configs/speech.py[:variant]] [--epochs 3]

Raw output of the default: ``experiments/results/speech_default/bucket_padding.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax.data.bucketing import bucket_length, epoch_batches  # noqa: E402
from moe_jax.data.speech import make_speech_data  # noqa: E402
from moe_jax.tasks.base import data_dir  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/speech.py", help="path.py[:variant]")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    path, _, variant = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("_speech_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant or "default")
    c, batch = config.data, int(config.train.batch_size)
    lengths_N = make_speech_data(c, data_dir=data_dir(config)).frame_counts("train")
    print(
        f"{args.config}: {len(lengths_N)} train utterances, frames mean {lengths_N.mean():.1f}, median "
        f"{np.median(lengths_N):.0f}, max {lengths_N.max()} (max_frames {c.max_frames}); buckets "
        f"{tuple(c.frame_buckets)}, window {c.bucket_window} batches of {batch}, seed {config.seed}"
    )
    for epoch in range(args.epochs):
        batches_BK = epoch_batches(
            lengths_N, batch, seed=int(config.seed), epoch=epoch, window_batches=int(c.bucket_window)
        )
        padded_B = np.array(
            [bucket_length(lengths_N[b].max(), c.frame_buckets, c.max_frames) for b in batches_BK]
        )
        sizes, counts = np.unique(padded_B, return_counts=True)
        print(
            f"epoch {epoch}: {len(batches_BK)} batches, padded frames per row {padded_B.mean():.1f} vs "
            f"{c.max_frames} for random batches ({padded_B.mean() / c.max_frames:.2f}x), real/padded "
            f"{lengths_N[batches_BK].sum() / (padded_B.sum() * batch):.3f} (random: "
            f"{lengths_N.mean() / c.max_frames:.3f}); batches per bucket "
            f"{dict(zip(sizes.tolist(), counts.tolist()))}"
        )


if __name__ == "__main__":
    main()
