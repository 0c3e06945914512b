"""Decoder-only sparse-MoE language models (Mixtral / OLMoE / Qwen-MoE / DeepSeek style).

Run (CPU, offline: the Python standard library's source files are the corpus; they and a byte-fallback
SentencePiece vocabulary are prepared on first use)::

    python -m moe_jax.main --config=configs/lm.py --workdir=runs/lm
    python -m moe_jax.generate --workdir=runs/lm --prompt="def fibonacci(n):" --max_new_tokens=64

Variants (``--config=configs/lm.py:VARIANT``):
    default: pre-norm decoder, d_model 128, 4 blocks, 4 heads with 2 key/value heads (GQA), RoPE, tied
        embeddings; block 0 dense (FFN 512), blocks 1-3 MoE: 8 experts of width 256, top-2 softmax router
        renormalised (Mixtral style), dropless in training, evaluation and generation; byte-fallback BPE
        vocab 2048, rows of 128 packed tokens (documents never attend across each other), batch 16,
        1,500 steps (3.1 M tokens of the 9+ M in the train split); evaluation on the whole validation
        split (4,959 rows of 128 tokens, 88 files) at step 750 and the end. Hardware: 2 CPU cores. Time:
        measured 10 min 14 s wall (data prepared; 551 s of training with the step-750 evaluation).
        Expected: measured validation loss 3.125, perplexity 22.7, 1.55 bits per byte; test 3.227; the
        dense arm of equal active FLOPs reaches 3.179 / 1.57
        (``experiments/results/moe_vs_dense_lm_32_experts_full_val``).
    dense: ``default`` with every block dense (FFN 512 = top-2 × expert width 256): the baseline of equal
        active FLOPs per token.
    smoke: a tiny model for a few steps (tests; seconds).
    lm1b, c4: TFDS ``lm1b`` / ``c4/en`` (prepare once: ``pip install 'moe_jax[tf]' && tfds build lm1b
        --file_format=array_record``); d_model 1024, 16 blocks, 32 experts top-2, bf16 compute, 32k vocab,
        rows of 1024. Hardware: 8 accelerators. Expected: not run here (the data is not on our machines).

Fine-tuning a Hugging Face checkpoint (``moe_jax.convert``):
    hf=DIR: the architecture of the Hugging Face model directory DIR (its config.json; see
        ``moe_jax/interop/hf_config.py``), with this file's default training settings and the corpus above.
        ``python -m moe_jax.convert --from_hf=DIR --workdir=W`` writes W's starting parameters; then
        ``python -m moe_jax.main --config=configs/lm.py:hf=DIR --workdir=W`` fine-tunes them. The
        tokenizer is the project's, trained for the model's vocabulary size (the HF tokenizer is not read).

Plan-only variants (the published dimensions; for ``experiments/compare_sharding.py --topology=...`` and the
pod-scale work; never trained here). ``tests/test_lm_configs.py`` checks each one's total and active
(per-token) parameter counts against the published figures:
    mixtral_8x7b: 32 blocks, d_model 4096, 32 heads / 8 KV heads of 128, 8 experts of 14336 top-2
        (renormalised), RoPE θ 1e6, vocab 32000, untied. Published: 46.7 B total, 12.9 B active (Mistral AI,
        "Mixtral of experts", 2023).
    olmoe_1b_7b: 16 blocks, d_model 2048, 16 heads of 128, QK norm over the whole projection, 64 experts of
        1024 top-8 (not renormalised), vocab 50304, untied. Published: 6.9 B total, 1.3 B active
        (Muennighoff et al., "OLMoE: Open Mixture-of-Experts Language Models", arXiv:2409.02060).
    qwen3_moe_30b_a3b: 48 blocks, d_model 2048, 32 heads / 4 KV heads of 128, per-head QK norm, 128 experts
        of 768 top-8 (renormalised), RoPE θ 1e6, vocab 151936, untied. Published: 30.5 B total, 3.3 B
        activated (the Qwen3-30B-A3B model card, Qwen team, 2025).
    deepseek_v3: 61 blocks, d_model 7168, first 3 dense (FFN 18432), then 256 routed experts of 2048 top-8
        plus 1 shared expert of 2048, sigmoid scores with aux-loss-free selection bias, renormalised gates
        × 2.5, vocab 129280, untied. Attention is standard grouped-query attention instead of MLA: 128
        query heads and 8 KV heads of width 96, chosen so a block's attention holds 187.2 M parameters, as
        MLA's does (187.1 M); the multi-token-prediction module is left out. Published: 671 B total, 37 B
        activated (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437).
"""

from moe_jax import config_lib

PLAN_ONLY = ("mixtral_8x7b", "olmoe_1b_7b", "qwen3_moe_30b_a3b", "deepseek_v3")


def _plan_only(c, *, vocab: int, seq_len: int, **model):
    """Shapes for the ahead-of-time planner: bf16 compute, dropless routing, batch of 256 rows."""
    c.data.vocab_size = vocab
    c.data.seq_len = seq_len
    c.model.update(dtype="bfloat16", max_len=seq_len, tie_embeddings=False, **model)
    c.train.update(batch_size=256, num_train_steps=100_000, log_every=100, eval_every=5000)
    c.optim.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
    c.eval.batch_size = 256
    return c


def get_config(variant: str = "default"):
    variant = variant or "default"
    if variant.startswith("hf="):
        from moe_jax.interop import hf

        c = hf.lm_config_from_dir(variant[len("hf=") :])
        c.optim.update(learning_rate=3e-4, warmup_steps=50)
        c.train.update(batch_size=16, num_train_steps=500, log_every=50, eval_every=250)
        c.data.seq_len = 128
        return c
    c = config_lib.lm_config()
    if variant in ("default", "dense"):
        c.data.update(vocab_size=2048, seq_len=128)
        c.model.update(d_model=128, num_heads=4, num_kv_heads=2, d_ff=512, num_decoder_layers=4)
        c.model.moe.update(num_experts=8, top_k=2, d_ff=256, layers=(1, 2, 3))
        if variant == "dense":
            c.model.moe.layers = ()
        c.optim.update(learning_rate=3e-3, warmup_steps=100)
        c.train.update(batch_size=16, num_train_steps=1500, log_every=50, eval_every=750)
    elif variant == "smoke":
        c.data.update(vocab_size=300, seq_len=32, tokenizer_train_chars=200_000)
        c.model.update(d_model=32, num_heads=2, num_kv_heads=1, d_ff=64, num_decoder_layers=2)
        c.model.moe.update(num_experts=4, top_k=2, d_ff=32, layers=(1,))
        c.optim.update(learning_rate=3e-3, warmup_steps=2)
        c.train.update(batch_size=8, num_train_steps=4, log_every=1, eval_every=2, checkpoint_every=2)
        c.eval.update(batch_size=8, max_eval_examples=16, num_samples=1, prompt_tokens=8, max_new_tokens=8)
    elif variant in ("lm1b", "c4"):
        c.data.update(
            source="lm1b" if variant == "lm1b" else "c4/en",
            vocab_size=32_000,
            seq_len=1024,
            tokenizer_train_chars=50_000_000,
        )
        # lm1b has no validation split and c4 no test split: each evaluates on halves of the one it has.
        held_out = "test" if variant == "lm1b" else "validation"
        c.data.splits = {"validation": f"{held_out}[:50%]", "test": f"{held_out}[50%:]"}
        c.model.update(
            d_model=1024, num_heads=16, num_kv_heads=4, d_ff=4096, num_decoder_layers=16, dtype="bfloat16"
        )
        c.model.moe.update(num_experts=32, top_k=2, d_ff=2048, layers=tuple(range(1, 16)))
        c.optim.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1)
        c.train.update(
            batch_size=256, num_train_steps=50_000, log_every=100, eval_every=2000, checkpoint_every=2000
        )
        c.eval.update(batch_size=64, max_eval_examples=2048)
    elif variant == "mixtral_8x7b":
        _plan_only(
            c,
            vocab=32_000,
            seq_len=4096,
            d_model=4096,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            d_ff=14_336,
            num_decoder_layers=32,
            rope_theta=1e6,
            norm_eps=1e-5,
        )
        c.model.moe.update(num_experts=8, top_k=2, d_ff=14_336, layers=tuple(range(32)))
    elif variant == "olmoe_1b_7b":
        _plan_only(
            c,
            vocab=50_304,
            seq_len=4096,
            d_model=2048,
            num_heads=16,
            head_dim=128,
            d_ff=1024,
            num_decoder_layers=16,
            qk_norm="full",
            norm_eps=1e-5,
        )
        c.model.moe.update(num_experts=64, top_k=8, d_ff=1024, normalize_gates=False, layers=tuple(range(16)))
    elif variant == "qwen3_moe_30b_a3b":
        _plan_only(
            c,
            vocab=151_936,
            seq_len=4096,
            d_model=2048,
            num_heads=32,
            num_kv_heads=4,
            head_dim=128,
            d_ff=6144,
            num_decoder_layers=48,
            qk_norm="head",
            rope_theta=1e6,
        )
        c.model.moe.update(num_experts=128, top_k=8, d_ff=768, layers=tuple(range(48)))
    elif variant == "deepseek_v3":
        _plan_only(
            c,
            vocab=129_280,
            seq_len=4096,
            d_model=7168,
            num_heads=128,
            num_kv_heads=8,
            head_dim=96,
            d_ff=18_432,
            num_decoder_layers=61,
        )
        c.model.moe.update(
            num_experts=256,
            top_k=8,
            d_ff=2048,
            layers=tuple(range(3, 61)),
            num_shared_experts=1,
            shared_d_ff=2048,
            score_fn="sigmoid",
            routed_scaling_factor=2.5,
            selection_bias=True,
        )
        c.loss.lb_weight = 1e-4  # the sequence-wise balance loss is a backstop to the selection bias
    else:
        choices = ", ".join(("default", "dense", "smoke", "lm1b", "c4") + PLAN_ONLY + ("hf=DIR",))
        raise ValueError(f"unknown variant {variant!r}; choose one of {choices}")
    return c
