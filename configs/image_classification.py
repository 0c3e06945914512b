"""Image classification with a V-MoE Vision Transformer (MoE MLPs on every other block of the last half).

Run (CPU, offline; scikit-learn's 8x8 digits are prepared into a TFDS dataset on first use)::

    python -m moe_jax.main --config=configs/image_classification.py --workdir=runs/digits

Variants (``--config=configs/image_classification.py:VARIANT``):
    default: sklearn digits (1,262 train / 175 validation / 360 test), 8x8 images in 2x2 patches, d_model 64,
        6 blocks, MoE (8 experts, top-2, batch-prioritized, capacity 1.25 train / 2.0 eval, routing groups
        of 16 images) in blocks 3 and 5; 1,500 steps of batch 64. Hardware: 2 CPU cores. Time: measured
        ~5 minutes on a shared 2-core machine (train loop 294 s). Expected: test top-1 ~94% (measured
        93.9%; 94.7% with per-image routing groups), eval dropped fraction < 1%. Re-run 2026-12-01 after the
        one-trainer redesign: 2 min 35 s, test top-1 95.3% (the old code, re-run the same day: 93.9%; same
        first steps to the bit, runs drift apart through rounding).
    smoke: a tiny model for a few steps (tests; seconds).
    cifar10: CIFAR-10 32x32, patch 4, d_model 256, 8 blocks, 8 experts top-2. Needs the TFDS data prepared
        once (``pip install 'moe_jax[tf]' && tfds build cifar10 --file_format=array_record``). Hardware: one
        GPU, ~1 hour; expected test accuracy ~85% (no augmentation beyond flips is used: none here).
    imagenet2012: ImageNet-1k at 224, V-MoE-S/16 shape (d_model 384, 12 blocks, 32 experts top-2, MoE on
        every other block of the last half). Needs the manually downloaded ImageNet prepared with TFDS.
        Hardware: a TPU v3-32 / 8 GPUs, ~2 days; expected top-1 in the mid 70s (V-MoE-S/16 reports ~77%
        with JFT pre-training; from scratch expect lower).
"""

import ml_collections

from moe_jax import config_lib


def get_config(variant: str = "default"):
    c = config_lib.base_config()
    c.task = "image_classification"

    c.data = ml_collections.ConfigDict()
    c.data.source = "sklearn_digits"
    c.data.builder_config = None
    c.data.image_size = 8
    c.data.channels = 1
    c.data.num_classes = 10
    c.data.splits = ml_collections.ConfigDict({"train": "train", "validation": "validation", "test": "test"})
    c.data.num_threads = 2
    c.data.random_shift = 0  # ±1 px shifts measured 92.8% (vs 93.9% without) at 1,500 steps

    # Fields of moe_jax.models.ViTConfig; image size, channels and classes follow the data section.
    c.model = ml_collections.ConfigDict()
    c.model.image_size = c.data.get_ref("image_size")
    c.model.channels = c.data.get_ref("channels")
    c.model.num_classes = c.data.get_ref("num_classes")
    c.model.patch_size = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.d_ff = 128
    c.model.num_layers = 6
    c.model.activation = "gelu"
    c.model.norm = "layernorm"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    # layers=None: the V-MoE pattern (every other block of the last half: 3 and 5 of 6). Routing groups of
    # 16 images (16 patches each): capacity is shared across images, as in V-MoE, so batch-prioritized routing
    # ranks patches of different images against each other. selection_bias: aux-loss-free balancing
    # (DeepSeek-V3); grouped_backend: core (CPU/GPU), megablox (TPU), mosaic_gpu (H200); expert_parallel:
    # gspmd or shard_map (explicit collectives over the expert axis; ep_transport: capacity, ring, ragged).
    c.model.moe = config_lib.moe_section(
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        batch_prioritized=True,
        group_size=256,
    )

    c.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=1e-4, b2=0.999, eps=1e-8)
    c.loss.z_weight = 1e-3
    c.train.update(
        batch_size=64,
        num_train_steps=1500,
        log_every=100,
        eval_every=500,
        checkpoint_every=500,
        tensorboard=False,
    )
    c.eval.update(batch_size=128, max_eval_examples=0)

    if variant in ("default", "", None):
        pass
    elif variant == "smoke":
        c.model.update(d_model=16, num_heads=2, d_ff=32, num_layers=2)
        c.model.moe.update(num_experts=4, layers=(1,), group_size=None)
        c.optim.warmup_steps = 1
        c.train.update(batch_size=8, num_train_steps=3, log_every=1, eval_every=2, checkpoint_every=2)
        c.eval.update(batch_size=8, max_eval_examples=16)
    elif variant == "cifar10":
        c.data.update(source="cifar10", image_size=32, channels=3, num_classes=10)
        c.data.splits.validation = "test"  # CIFAR-10 has no validation split
        c.data.random_shift = 2
        c.model.moe.group_size = 64 * 4  # 4 images of 64 patches
        c.model.update(patch_size=4, d_model=256, num_heads=4, d_ff=1024, num_layers=8)
        c.model.moe.num_experts = 8
        c.optim.update(learning_rate=1e-3, warmup_steps=1000, weight_decay=0.05)
        c.train.update(
            batch_size=256, num_train_steps=30_000, log_every=100, eval_every=2000, checkpoint_every=2000
        )
        c.eval.update(batch_size=256, max_eval_examples=0)
    elif variant == "imagenet2012":
        c.data.update(source="imagenet2012", image_size=224, channels=3, num_classes=1000)
        c.data.splits.update(validation="validation", test="validation")  # test labels are not public
        c.data.random_shift = 8
        c.model.moe.group_size = 196 * 4  # 4 images of 196 patches
        c.model.update(patch_size=16, d_model=384, num_heads=6, d_ff=1536, num_layers=12, dtype="bfloat16")
        c.model.moe.num_experts = 32
        c.optim.update(learning_rate=1e-3, warmup_steps=10_000, weight_decay=0.1)
        c.train.update(
            batch_size=1024, num_train_steps=300_000, log_every=100, eval_every=10_000, checkpoint_every=5000
        )
        c.eval.update(batch_size=1024, max_eval_examples=0)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose default, smoke, cifar10 or imagenet2012")
    return c
