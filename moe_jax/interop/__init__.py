"""Checkpoints of other libraries in and out: :mod:`moe_jax.interop.hf` (Hugging Face safetensors)."""
