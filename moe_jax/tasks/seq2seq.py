"""Sequence-to-sequence tasks (translation: BLEU; summarization: ROUGE-1/2/L) on the encoder-decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task, data_dir, missing_data
from moe_jax.train import decode as decode_lib
from moe_jax.train.step import cross_entropy


def text_metrics(task: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    """BLEU (translation) or ROUGE-1/2/L F-measures (summarization), 0-100."""
    from moe_jax.train import metrics_text

    if task == "summarization":
        return {k: float(v) for k, v in metrics_text.rouge(hyps, refs).items()}
    return {"bleu": float(metrics_text.bleu(hyps, refs))}


def loss_sums(model, batch, *, dropout_key, deterministic, label_smoothing: float = 0.0):
    """Teacher-forced token cross-entropy of ``targets`` (pad 0 weighs nothing; ``row_weight`` if given)."""
    targets_BL = batch["targets"]
    weights_BL = (targets_BL != 0).astype(jnp.float32)
    if "row_weight" in batch:
        weights_BL = weights_BL * batch["row_weight"][:, None]
    logits_BLV, aux = model(batch["inputs"], targets_BL, dropout_key=dropout_key, deterministic=deterministic)
    ce_sum, correct = cross_entropy(logits_BLV, targets_BL, weights_BL, label_smoothing)
    return {"loss_sum": ce_sum, "correct_sum": correct, "weight_sum": weights_BL.sum()}, aux


class Seq2SeqTask(Task):
    """Translation and summarization: ``inputs`` → ``targets`` with teacher forcing; greedy/beam decoding."""

    train_keys = ("inputs", "targets")
    eval_keys = ("inputs", "targets", "row_weight")

    def load_data(self, config):
        if config.data.source == "synthetic":
            from moe_jax.train.synthetic import make_synthetic_data

            return make_synthetic_data(config.data, seed=config.seed)
        from moe_jax.data import DatasetUnavailableError, make_seq2seq_data

        try:
            return make_seq2seq_data(config.data, data_dir=data_dir(config), seed=config.seed)
        except DatasetUnavailableError as e:
            raise missing_data(e) from None

    def build_model(self, config, data):
        from moe_jax.models import ModelConfig, Seq2SeqTransformer

        tok = data.tokenizer
        try:
            cfg = ModelConfig.from_mapping(config.model.to_dict(), vocab_size=tok.vocab_size)
            return Seq2SeqTransformer(cfg, bos_id=tok.bos_id, rngs=nnx.Rngs(params=int(config.seed)))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from None

    def count_tokens(self, batch) -> float:
        return float(np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"]))

    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        return loss_sums(
            model,
            batch,
            dropout_key=dropout_key,
            deterministic=deterministic,
            label_smoothing=self.label_smoothing,
        )

    # -- decoding ----------------------------------------------------------------------------------------
    def _decoders(self, run):
        if getattr(run, "_seq2seq_decoders", None) is None:
            config, tok, graphdef = self.config, run.data.tokenizer, run.graphdef
            max_len = int(config.eval.get("max_decode_len") or config.data.max_target_len)

            def greedy(state, inputs):
                model, _ = nnx.merge(graphdef, state)
                return decode_lib.greedy_decode(
                    model, inputs, max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id
                )

            def beam(state, inputs):
                model, _ = nnx.merge(graphdef, state)
                return decode_lib.beam_search(
                    model,
                    inputs,
                    beam_size=int(config.eval.beam_size),
                    max_len=max_len,
                    bos_id=tok.bos_id,
                    eos_id=tok.eos_id,
                    alpha=float(config.eval.length_penalty),
                )

            shardings = (run.state_sh, run.batch_sh)
            run._seq2seq_decoders = {
                "greedy": jax.jit(greedy, in_shardings=shardings),
                "beam": jax.jit(beam, in_shardings=shardings),
            }
        return run._seq2seq_decoders

    def predict_and_score(self, run, state, split: str = "test", *, beam: bool | None = None, stream=None):
        """Greedy (and beam) decoding of ``split`` scored with BLEU/ROUGE; prints a few samples."""
        cfg, tok = self.config.eval, run.data.tokenizer
        if not cfg.max_decode_examples:
            return {}
        beam = int(cfg.beam_size) > 0 if beam is None else beam
        fns = self._decoders(run)
        hyps = {"greedy": [], "beam": []} if beam else {"greedy": []}
        refs, srcs = [], []
        for batch in run.data.eval_batches(split, int(cfg.batch_size), max_examples=cfg.max_decode_examples):
            keep = np.asarray(batch["row_weight"]) > 0
            inputs = run.put(batch["inputs"])
            for name in hyps:
                out = decode_lib.to_token_lists(jax.device_get(fns[name](state, inputs)), tok.eos_id)
                hyps[name] += [tok.decode(ids) for ids, k in zip(out, keep) if k]
            refs += [t for t, k in zip(batch["targets_text"], keep) if k]
            srcs += [t for t, k in zip(batch["inputs_text"], keep) if k]
        metrics = {}
        for name, h in hyps.items():
            metrics.update({f"{name}_{k}": v for k, v in text_metrics(self.config.task, h, refs).items()})
        for i in range(min(int(cfg.num_samples), len(refs))):
            print(
                f"--- sample {i}\n  input:  {srcs[i][:200]}\n  target: {refs[i][:200]}\n"
                + "".join(f"  {name}: {h[i][:200]}\n" for name, h in hyps.items()),
                file=stream,
                end="",
                flush=True,
            )
        return metrics

    def at_start(self, run, state, *, stream=None):
        if not self.config.eval.get("decode_at_start"):
            return {}
        return self.predict_and_score(run, state, "test", beam=False, stream=stream)
