"""Fields shared by every seq2seq config; task files import :func:`get_base_config` and override a few.

Not a runnable config by itself (it has no ``get_config``).
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "translation"  # 'translation' scores BLEU, 'summarization' ROUGE-1/2/L
    c.seed = 0
    # '' means $MOE_JAX_DATA_DIR, else ~/.cache/moe_jax/data (prepared corpora and tokenizers live there).
    c.data_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "gettext_translation"
    c.data.builder_config = "en_de"
    c.data.input_key = None
    c.data.target_key = None
    c.data.vocab_size = 4000
    c.data.max_input_len = 32
    c.data.max_target_len = 32
    c.data.tokenizer_train_examples = 50_000

    # Fields of moe_jax.models.ModelConfig (vocab_size comes from the tokenizer).
    c.model = ml_collections.ConfigDict()
    c.model.kind = "seq2seq"
    c.model.d_model = 256
    c.model.num_heads = 4
    c.model.head_dim = None
    c.model.d_ff = 512
    c.model.num_encoder_layers = 4
    c.model.num_decoder_layers = 4
    c.model.moe_every = 2
    c.model.moe_offset = 1
    c.model.num_experts = 8
    c.model.top_k = 2
    c.model.moe_d_ff = None
    c.model.router = "token_choice"
    c.model.capacity_factor = 1.25
    c.model.eval_capacity_factor = "same"
    c.model.dispatch = "auto"
    c.model.num_shared_experts = 0
    c.model.group_size = None
    c.model.jitter_noise = 0.0
    c.model.selection_bias = False  # aux-loss-free balancing (DeepSeek-V3), updated every training step
    c.model.selection_bias_rate = 1e-3
    c.model.grouped_backend = "auto"  # dropless matmuls: core (CPU/GPU), megablox (TPU), mosaic_gpu (H200)
    c.model.expert_parallel = "gspmd"  # or "shard_map" (explicit all_to_all over the expert mesh axis)
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.positions = "rope"
    c.model.max_len = 512
    c.model.tie_embeddings = True
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # 'bfloat16' computes in bf16 with float32 parameters
    c.model.param_dtype = "float32"

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


def transformer_base_moe(c: ml_collections.ConfigDict, **model_overrides) -> ml_collections.ConfigDict:
    """Transformer-base-sized MoE encoder-decoder for accelerators: 6+6 layers, 32 experts top-2, bf16."""
    c.model.update(
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        num_experts=32,
        top_k=2,
        dtype="bfloat16",
        dropout_rate=0.1,
        **model_overrides,
    )
    c.loss.label_smoothing = 0.1
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a few seconds of training (tests)."""
    c.data.vocab_size = 500
    c.data.max_input_len = 16
    c.data.max_target_len = 16
    c.data.tokenizer_train_examples = 5000
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.d_ff = 64
    c.model.num_encoder_layers = 2
    c.model.num_decoder_layers = 2
    c.model.num_experts = 4
    c.model.top_k = 2
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
