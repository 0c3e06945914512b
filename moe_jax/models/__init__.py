"""Transformer models whose FFNs are sparse MoE layers (imports only jax/flax/numpy).

Build a model from its config section: ``ModelConfig.from_mapping(config.model.to_dict(), vocab_size=V)`` →
:class:`Seq2SeqTransformer` / :class:`DecoderLM`; ``ViTConfig.from_mapping(...)`` → :class:`ViTClassifier`;
``VLMConfig.from_mapping(..., vocab_size=V)`` → :class:`VisionLanguageModel`. Every one of them stacks the
same :class:`Block` and says where its MoE layers go with one :class:`MoeConfig` (``config.model.moe``).
"""

from moe_jax.models.blocks import Block
from moe_jax.models.config import MoeConfig, alternate_layers, vmoe_layers
from moe_jax.models.transformer import DecoderLM, ModelConfig, Seq2SeqTransformer, causal_mask, shift_right
from moe_jax.models.vit import ViTClassifier, ViTConfig
from moe_jax.models.vlm import VisionLanguageModel, VLMConfig

__all__ = [
    "Block",
    "DecoderLM",
    "ModelConfig",
    "MoeConfig",
    "Seq2SeqTransformer",
    "ViTClassifier",
    "ViTConfig",
    "VLMConfig",
    "VisionLanguageModel",
    "alternate_layers",
    "causal_mask",
    "shift_right",
    "vmoe_layers",
]
