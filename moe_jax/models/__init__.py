"""Transformer models whose FFNs are sparse MoE layers (imports only jax/flax/numpy)."""

from moe_jax.models.transformer import DecoderLM, ModelConfig, Seq2SeqTransformer, causal_mask, shift_right

__all__ = ["DecoderLM", "ModelConfig", "Seq2SeqTransformer", "causal_mask", "shift_right"]
