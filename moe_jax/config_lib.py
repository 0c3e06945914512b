"""What the config files in ``configs/`` share: the common sections and ONE builder of ``config.model.moe``.

Config files import it as a package module (``from moe_jax import config_lib``) and override a few fields.
The schema of a model section is its model config's dataclass (``moe_jax.models``): ``config.model`` holds
the fields of ``ModelConfig`` / ``ViTConfig`` / ``VLMConfig``, ``config.model.moe`` (and, in the VLM,
``config.model.vision.moe``) every field of :class:`~moe_jax.models.config.MoeConfig`, made here by
:func:`moe_section`; ``from_mapping`` refuses any other key.

Imports ml_collections (the training stack), unlike ``moe_jax.models``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from moe_jax.models.config import MoeConfig

# MoeConfig fields whose values change kind (None, a number or "same"; None or a tuple): typed ``object`` so
# that ``--config.model.moe.capacity_factor=None`` or ``--config.model.moe.layers=(1,3)`` parse.
_UNTYPED = ("d_ff", "layers", "capacity_factor", "eval_capacity_factor", "group_size", "shared_d_ff")


def moe_section(**overrides) -> ml_collections.ConfigDict:
    """``config.model.moe``: every :class:`~moe_jax.models.config.MoeConfig` field, defaults overridden.

    Args:
        **overrides: MoeConfig fields (``num_experts=8``, ``layers=(3, 5)``, ``group_size=256`` ...).

    Raises:
        ValueError: an override is not a MoeConfig field (the message lists them).
    """
    fields = [f for f in dataclasses.fields(MoeConfig)]
    names = {f.name for f in fields}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"moe_section: {unknown} are not MoeConfig fields; known: {sorted(names)}")
    moe = ml_collections.ConfigDict()
    for f in fields:
        value = overrides.get(f.name, f.default)
        moe[f.name] = ml_collections.FieldReference(value, field_type=object) if f.name in _UNTYPED else value
    return moe


def base_config() -> ml_collections.ConfigDict:
    """The sections every task shares (optimizer, losses, training, evaluation, sharding); ``data`` and
    ``model`` start empty for the task file to fill."""
    c = ml_collections.ConfigDict()
    c.task = "translation"  # 'translation' scores BLEU, 'summarization' ROUGE-1/2/L
    c.seed = 0
    # '' means $MOE_JAX_DATA_DIR, else ~/.cache/moe_jax/data (prepared corpora and tokenizers live there).
    c.data_dir = ""
    c.data = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 200
    c.optim.end_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-9
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0
    c.loss.lb_weight = 0.01
    c.loss.z_weight = 1e-3

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.num_train_steps = 2000
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.nonfinite = "stop"  # 'stop': end the run naming the step; 'skip': drop that update and go on
    c.train.tensorboard = True
    # (first, last): a jax.profiler trace of those training steps in WORKDIR/profile; None: no trace.
    c.train.profile_steps = _untyped(None)

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.max_eval_examples = 1000
    c.eval.max_decode_examples = 500
    c.eval.max_decode_len = 0  # 0: data.max_target_len
    c.eval.beam_size = 4
    c.eval.length_penalty = 0.6
    c.eval.num_samples = 3
    c.eval.decode_at_start = False

    c.sharding = ml_collections.ConfigDict()
    c.sharding.preset = "ep"
    c.sharding.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
    return c


def seq2seq_config() -> ml_collections.ConfigDict:
    """:func:`base_config` with the seq2seq data section and the encoder-decoder's ``model`` section."""
    c = base_config()
    c.data.source = "gettext_translation"
    c.data.builder_config = "en_de"
    c.data.input_key = None
    c.data.target_key = None
    c.data.vocab_size = 4000
    c.data.max_input_len = 32
    c.data.max_target_len = 32
    c.data.tokenizer_train_examples = 50_000

    # Fields of moe_jax.models.ModelConfig (vocab_size comes from the tokenizer).
    c.model.d_model = 256
    c.model.remat_policy = "none"  # or full / dots_saveable / ...: recompute blocks in the backward pass
    c.model.scan_layers = False  # True: repeated blocks stacked and run by a scan (pod-scale compiles)
    c.model.num_heads = 4
    c.model.head_dim = None
    c.model.d_ff = 512
    c.model.num_encoder_layers = 4
    c.model.num_decoder_layers = 4
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.positions = "rope"
    c.model.max_len = 512
    c.model.tie_embeddings = True
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # 'bfloat16' computes in bf16 with float32 parameters
    c.model.param_dtype = "float32"
    # layers=None: blocks 1, 3, ... of each stack. selection_bias: aux-loss-free balancing (DeepSeek-V3).
    # grouped_backend (dropless matmuls): core (CPU/GPU), megablox (TPU), mosaic_gpu (H200). expert_parallel:
    # gspmd, or shard_map (explicit collectives over the expert mesh axis) with ep_transport capacity
    # (all-to-all of capacity buffers), ring (all-gather tokens, reduce-scatter outputs) or ragged.
    c.model.moe = moe_section(num_experts=8, top_k=2, capacity_factor=1.25)
    return c


def _untyped(value) -> ml_collections.FieldReference:
    """A field that may hold None or a value (so ``--config.model.X=None`` and ``=64`` both parse)."""
    return ml_collections.FieldReference(value, field_type=object)


def lm_config() -> ml_collections.ConfigDict:
    """:func:`base_config` for the decoder-only LM: packed-text data section, decoder ``model`` section.

    The model section holds every :class:`~moe_jax.models.ModelConfig` field the decoder reads (no encoder);
    MoE routing is dropless in training and evaluation (``capacity_factor=None``): a language model's
    evaluation and its token-by-token generation then route every token as in training.
    """
    c = base_config()
    c.task = "language_modeling"
    c.data.source = "python_source"  # offline: the Python standard library's source files
    c.data.builder_config = None
    c.data.text_key = "text"
    c.data.vocab_size = 4096
    c.data.seq_len = 256
    c.data.tokenizer_train_chars = 4_000_000
    c.data.num_threads = 2
    # Packed rows of one file follow each other (a large test file spans hundreds of rows): shuffling in
    # windows of 16k rows (2 M tokens at 128 per row; ~2 s to fill) mixes ~1/5 of the corpus per batch.
    c.data.shuffle_rows = 16_384

    c.model.d_model = 256
    c.model.remat_policy = "none"  # or full / dots_saveable / ...: recompute blocks in the backward pass
    c.model.scan_layers = False  # True: repeated blocks stacked and run by a scan (pod-scale compiles)
    c.model.num_heads = 4
    c.model.num_kv_heads = _untyped(None)  # None: num_heads (multi-head); fewer: grouped-query attention
    c.model.head_dim = _untyped(None)
    c.model.d_ff = 1024  # dense blocks' FFN width (the experts' is moe.d_ff)
    c.model.num_encoder_layers = 0
    c.model.num_decoder_layers = 4
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.norm_eps = 1e-6
    c.model.positions = "rope"
    c.model.rope_theta = 10_000.0
    c.model.qk_norm = "none"  # 'head' (Qwen3-MoE) or 'full' (OLMoE)
    c.model.qkv_bias = False
    c.model.logits_soft_cap = _untyped(None)
    c.model.max_len = 4096
    c.model.tie_embeddings = True
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.moe = moe_section(num_experts=8, top_k=2, capacity_factor=None, eval_capacity_factor=None)

    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.train.batch_size = 16
    c.eval.batch_size = 16
    # Packed rows of seq_len tokens; None: the whole split. Rows come in stored document order, so a capped
    # evaluation covers the first few documents only (the default corpus's first 256 rows of 128 tokens are
    # 8 of its 88 validation files), a sample too narrow to compare models by.
    c.eval.max_eval_examples = _untyped(None)
    c.eval.max_decode_examples = 0  # the LM scores generations by perplexity, not BLEU
    c.eval.beam_size = 0
    c.eval.num_samples = 2  # sample continuations printed at the end
    c.eval.prompt_tokens = 32  # each sample prompt: the opening tokens of a test document
    c.eval.max_new_tokens = 64
    c.eval.temperature = 0.0  # 0: greedy
    return c


def transformer_base_moe(c: ml_collections.ConfigDict, **model_overrides) -> ml_collections.ConfigDict:
    """Transformer-base-sized MoE encoder-decoder for accelerators: 6+6 layers, 32 experts top-2, bf16."""
    c.model.update(
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dtype="bfloat16",
        dropout_rate=0.1,
        **model_overrides,
    )
    c.model.moe.update(num_experts=32, top_k=2)
    c.loss.label_smoothing = 0.1
    return c


def seq2seq_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a seq2seq config to a few seconds of training (tests)."""
    c.data.vocab_size = 500
    c.data.max_input_len = 16
    c.data.max_target_len = 16
    c.data.tokenizer_train_examples = 5000
    c.model.update(d_model=32, num_heads=2, d_ff=64, num_encoder_layers=2, num_decoder_layers=2)
    c.model.moe.update(num_experts=4, top_k=2)
    c.optim.warmup_steps = 2
    c.optim.learning_rate = 3e-3
    c.train.batch_size = 8
    c.train.num_train_steps = 4
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.batch_size = 8
    c.eval.max_eval_examples = 16
    c.eval.max_decode_examples = 8
    c.eval.beam_size = 2
    c.eval.num_samples = 1
    return c
