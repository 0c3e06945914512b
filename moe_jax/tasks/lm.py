"""Decoder-only language modelling: next-token loss on packed documents, perplexity, bits per byte, samples.

Batches (``moe_jax.data.lm``) pack documents into rows with ``segment_ids`` (attention and MoE routing never
cross documents) and per-document ``positions``. Evaluation reports the loss, perplexity, token accuracy and
bits per byte (nats / ln 2 per UTF-8 byte of the predicted text, comparable across tokenizers), and prints
greedy (or sampled) continuations of test-document openings generated with the KV cache.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task, data_dir, missing_data
from moe_jax.train import decode as decode_lib
from moe_jax.train.step import cross_entropy

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "token_weight")


def build_decoder(config, vocab_size: int):
    """The config's :class:`~moe_jax.models.DecoderLM` (``config.model``; parameters seeded by the seed).

    Raises:
        ConfigError: a bad model field (naming it).
    """
    from moe_jax.models import DecoderLM, ModelConfig

    try:
        cfg = ModelConfig.from_mapping(config.model.to_dict(), vocab_size=vocab_size)
        return DecoderLM(cfg, rngs=nnx.Rngs(params=int(config.seed)))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def lm_loss_sums(model, batch, *, dropout_key, deterministic, byte_lengths_V=None, label_smoothing=0.0):
    """Summed next-token cross-entropy over ``token_weight`` (times ``row_weight`` when given).

    With ``byte_lengths_V`` (UTF-8 bytes each id stands for) the sums also hold ``byte_sum``, the bytes of
    the predicted text, for bits per byte.
    """
    weights_BL = batch["token_weight"].astype(jnp.float32)
    if "row_weight" in batch:
        weights_BL = weights_BL * batch["row_weight"][:, None]
    logits_BLV, aux = model(
        batch["inputs"],
        segment_ids_BL=batch["segment_ids"],
        positions_BL=batch["positions"],
        dropout_key=dropout_key,
        deterministic=deterministic,
    )
    ce_sum, correct = cross_entropy(logits_BLV, batch["targets"], weights_BL, label_smoothing)
    sums = {"loss_sum": ce_sum, "correct_sum": correct, "weight_sum": weights_BL.sum()}
    if byte_lengths_V is not None:
        sums["byte_sum"] = jnp.sum(jnp.take(byte_lengths_V, batch["targets"]) * weights_BL)
    return sums, aux


class LanguageModelingTask(Task):
    """Causal LM on packed text (``config.task='language_modeling'``, ``configs/lm.py``)."""

    train_keys = BATCH_KEYS
    eval_keys = BATCH_KEYS + ("row_weight",)
    identity_data_fields = ("source", "builder_config", "text_key")

    def __init__(self, config):
        super().__init__(config)
        self._byte_lengths_V = None

    def validate(self, config, *, data_parallel: int) -> None:
        seq_len = config.data.get("seq_len")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError(f"config.data.seq_len={seq_len!r} must be an integer >= 2")
        if config.model.get("positions") == "learned" and seq_len > config.model.max_len:
            raise ConfigError(
                f"config.data.seq_len={seq_len} exceeds config.model.max_len={config.model.max_len} "
                "(learned positions)"
            )
        for name in ("max_new_tokens", "num_samples"):
            value = config.eval.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config.eval.{name}={value!r} must be an integer >= 0")

    def load_data(self, config):
        from moe_jax.data import DatasetUnavailableError
        from moe_jax.data.lm import make_lm_data

        try:
            return make_lm_data(config.data, data_dir=data_dir(config))
        except DatasetUnavailableError as e:
            raise missing_data(e) from None

    def build_model(self, config, data):
        self._byte_lengths_V = jnp.asarray(data.tokenizer.piece_byte_lengths(), jnp.float32)
        return build_decoder(config, data.tokenizer.vocab_size)

    def count_tokens(self, batch) -> float:
        return float(np.count_nonzero(batch["token_weight"]))

    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        return lm_loss_sums(
            model,
            batch,
            dropout_key=dropout_key,
            deterministic=deterministic,
            # Bits per byte only where it is reported (evaluation); training needs none of it.
            byte_lengths_V=self._byte_lengths_V if deterministic else None,
            label_smoothing=self.label_smoothing,
        )

    # -- samples -----------------------------------------------------------------------------------------
    def _generator(self, run):
        if getattr(run, "_lm_generate", None) is None:
            cfg, graphdef = self.config.eval, run.graphdef
            temperature = float(cfg.get("temperature", 0.0) or 0.0)

            def gen(state, prompt_BL, lengths_B, key):
                model, _ = nnx.merge(graphdef, state)
                return decode_lib.generate(
                    model,
                    prompt_BL,
                    lengths_B,
                    max_new_tokens=int(cfg.max_new_tokens),
                    eos_id=run.data.tokenizer.eos_id,
                    temperature=temperature,
                    top_k=int(cfg.get("top_k", 0) or 0),
                    top_p=float(cfg.get("top_p", 1.0) or 1.0),
                    key=key,
                )

            run._lm_generate = jax.jit(gen)
        return run._lm_generate

    def predict_and_score(self, run, state, split: str = "test", *, stream=None) -> dict[str, float]:
        """Continues the openings of ``num_samples`` documents of ``split`` and prints them.

        Returns the generation speed (``generate_tokens_per_second``, the cached path, compile excluded).
        """
        cfg, tok = self.config.eval, run.data.tokenizer
        n, new = int(cfg.get("num_samples", 0) or 0), int(cfg.get("max_new_tokens", 0) or 0)
        if not n or not new:
            return {}
        prompt_len = int(cfg.get("prompt_tokens", 32) or 32)
        prompts = []
        for batch in run.data.eval_batches(split, n, max_examples=n):
            for inputs_L, seg_L, w in zip(batch["inputs"], batch["segment_ids"], batch["row_weight"]):
                if w > 0:
                    first = inputs_L[(seg_L == seg_L[0]) & (seg_L > 0)]
                    prompts.append(first[:prompt_len])
        if not prompts:
            return {}
        lengths_B = np.array([len(p) for p in prompts], np.int32)
        prompt_BL = np.zeros((len(prompts), int(lengths_B.max())), np.int32)
        for i, p in enumerate(prompts):
            prompt_BL[i, : len(p)] = p
        gen = self._generator(run)
        key = jax.random.key(int(self.config.seed))
        args = (state, jnp.asarray(prompt_BL), jnp.asarray(lengths_B), key)
        jax.block_until_ready(gen(*args))  # compile outside the timing
        t0 = time.perf_counter()
        out_BS = np.asarray(jax.device_get(gen(*args)))
        seconds = time.perf_counter() - t0
        produced = 0
        for i, (p, out) in enumerate(zip(prompts, decode_lib.to_token_lists(out_BS, tok.eos_id))):
            produced += len(out)
            print(
                f"--- sample {i}\n  prompt:       {tok.decode(p)!r}\n  continuation: {tok.decode(out)!r}",
                file=stream,
                flush=True,
            )
        return {"generate_tokens_per_second": produced / max(seconds, 1e-9)}


def bits_per_byte(loss_sum: float, byte_sum: float) -> float:
    """Nats summed over tokens → bits per UTF-8 byte of the text they encode."""
    return loss_sum / (math.log(2.0) * max(byte_sum, 1.0))
