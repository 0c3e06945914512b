"""Speech recognition: log-mel frames → transcripts with an MoE encoder-decoder; WER and CER (jiwer).

Training is teacher-forced token cross-entropy over the transcript (SpecAugment in training only, inside
the model). Scores: greedy and beam decoding (the shared ``train/decode.py`` functions) of every split in
``config.eval.decode_splits``, word and character error rates in percent from ``jiwer``, named
``<split>_<greedy|beam>_<wer|cer>``: for the offline corpus ``test`` holds held-out sentences spoken by the
training voices and ``test_voice`` the same sentences spoken by a held-out voice. Splits other than
``test`` also get the loop's loss and routing metrics (``<split>_loss``, ``<split>/moe/...``). Sample
transcripts are printed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.errors import ConfigError
from moe_jax.tasks.base import Task, data_dir, missing_data
from moe_jax.train import decode as decode_lib
from moe_jax.train.step import cross_entropy


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus word and character error rates (percent) of ``hyps`` against ``refs`` (jiwer).

    Errors are summed over the corpus and divided by the reference words (characters), so WER can exceed
    100 when a model inserts words. Empty references are left out (jiwer cannot score them).
    """
    import jiwer

    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        return {}
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"wer": 100.0 * float(jiwer.wer(refs, hyps)), "cer": 100.0 * float(jiwer.cer(refs, hyps))}


def loss_sums(model, batch, *, dropout_key, deterministic, label_smoothing: float = 0.0, eos_id: int = 3):
    """Teacher-forced transcript cross-entropy (pad 0 weighs nothing; ``row_weight`` if given).

    In training with ``model.cfg.ctc_weight`` λ > 0 the summed loss is (1 − λ)·CE + λ·CTC (the CTC loss of
    each utterance summed, so both terms are per target token once divided by the token count).
    Evaluation reports the attention cross-entropy alone, so ``val_loss`` and perplexity stay comparable.
    """
    targets_BL = batch["targets"]
    weights_BL = (targets_BL != 0).astype(jnp.float32)
    if "row_weight" in batch:
        weights_BL = weights_BL * batch["row_weight"][:, None]
    ctc_weight = 0.0 if deterministic else float(model.cfg.ctc_weight)
    logits_BLV, aux = model(
        batch["features"],
        batch["num_frames"],
        targets_BL,
        dropout_key=dropout_key,
        deterministic=deterministic,
        eos_id=eos_id if ctc_weight else None,
    )
    ce_sum, correct = cross_entropy(logits_BLV, targets_BL, weights_BL, label_smoothing)
    loss_sum = ce_sum
    if ctc_weight:
        ctc_B = aux.pop("ctc")["loss_B"]
        loss_sum = (1.0 - ctc_weight) * ce_sum + ctc_weight * jnp.sum(ctc_B * weights_BL.max(axis=1))
    return {"loss_sum": loss_sum, "correct_sum": correct, "weight_sum": weights_BL.sum()}, aux


def greedy_transcribe(model, features_BTF, num_frames_B, *, max_len: int, bos_id: int, eos_id: int):
    """Greedy token ids ``int32[B, max_len]`` (see :func:`moe_jax.train.decode.greedy_decode_encoded`)."""
    enc_BKD, mask_BK, _ = model.encode_features(features_BTF, num_frames_B, deterministic=True)
    return decode_lib.greedy_decode_encoded(
        model, enc_BKD, mask_BK, max_len=max_len, bos_id=bos_id, eos_id=eos_id
    )


def beam_transcribe(
    model, features_BTF, num_frames_B, *, beam_size: int, max_len: int, bos_id: int, eos_id: int, alpha: float
):
    """Beam-search token ids ``int32[B, max_len]`` (GNMT length penalty ``alpha``)."""
    enc_BKD, mask_BK, _ = model.encode_features(features_BTF, num_frames_B, deterministic=True)
    return decode_lib.beam_search_encoded(
        model,
        enc_BKD,
        mask_BK,
        beam_size=beam_size,
        max_len=max_len,
        bos_id=bos_id,
        eos_id=eos_id,
        alpha=alpha,
    )


class SpeechRecognitionTask(Task):
    """``features`` (+ ``num_frames``) → ``targets``; greedy / beam decoding scored by WER and CER."""

    train_keys = ("features", "num_frames", "targets")
    eval_keys = ("features", "num_frames", "targets", "row_weight")
    identity_data_fields = (
        "source",
        "builder_config",
        "sample_rate",
        "num_mel_bins",
        "tokenizer_model_type",
        "lowercase",
    )

    eos_id = 3  # the project tokenizer's fixed EOS (moe_jax.data.tokenizer.EOS_ID)

    def validate(self, config, *, data_parallel: int) -> None:
        d, m = config.data, config.model
        if int(m.num_mel_bins) != int(d.num_mel_bins):
            raise ConfigError(
                f"config.model.num_mel_bins={m.num_mel_bins} must equal config.data.num_mel_bins="
                f"{d.num_mel_bins} (set both, or only config.data.num_mel_bins)"
            )
        from moe_jax.data.bucketing import check_buckets

        try:
            check_buckets(
                d.get("frame_buckets") or (),
                int(d.max_frames),
                "config.data.frame_buckets",
                "config.data.max_frames",
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for split in config.eval.decode_splits:
            if split not in d.splits:
                raise ConfigError(
                    f"config.eval.decode_splits names {split!r}, which config.data.splits lacks "
                    f"(it has {sorted(d.splits)})"
                )

    def load_data(self, config):
        from moe_jax.data import DatasetUnavailableError
        from moe_jax.data.speech import make_speech_data

        try:
            return make_speech_data(config.data, data_dir=data_dir(config))
        except DatasetUnavailableError as e:
            raise missing_data(e) from None

    def build_model(self, config, data):
        from moe_jax.models.speech import SpeechConfig, SpeechTransformer

        tok = data.tokenizer
        try:
            cfg = SpeechConfig.from_mapping(config.model.to_dict(), vocab_size=tok.vocab_size)
            return SpeechTransformer(cfg, bos_id=tok.bos_id, rngs=nnx.Rngs(params=int(config.seed)))
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from None

    def count_tokens(self, batch) -> float:
        return float(np.count_nonzero(batch["targets"]))

    def loss_sums(self, model, batch, *, dropout_key, deterministic):
        return loss_sums(
            model,
            batch,
            dropout_key=dropout_key,
            deterministic=deterministic,
            label_smoothing=self.label_smoothing,
            eos_id=self.eos_id,
        )

    # -- decoding ----------------------------------------------------------------------------------------
    def _decoders(self, run):
        if getattr(run, "_speech_decoders", None) is None:
            config, tok, graphdef = self.config, run.data.tokenizer, run.graphdef
            max_len = int(config.eval.get("max_decode_len") or config.data.max_target_len)
            ids = dict(max_len=max_len, bos_id=tok.bos_id, eos_id=tok.eos_id)

            def greedy(state, features, frames):
                return greedy_transcribe(nnx.merge(graphdef, state)[0], features, frames, **ids)

            def beam(state, features, frames):
                return beam_transcribe(
                    nnx.merge(graphdef, state)[0],
                    features,
                    frames,
                    beam_size=int(config.eval.beam_size),
                    alpha=float(config.eval.length_penalty),
                    **ids,
                )

            shardings = (run.state_sh, run.batch_sh, run.batch_sh)
            run._speech_decoders = {
                "greedy": jax.jit(greedy, in_shardings=shardings),
                "beam": jax.jit(beam, in_shardings=shardings),
            }
        return run._speech_decoders

    def transcribe_split(self, run, state, split: str, *, beam: bool, stream=None) -> dict[str, float]:
        """Decodes up to ``eval.max_decode_examples`` of ``split``: ``{split}_{greedy,beam}_{wer,cer}``."""
        cfg, tok = self.config.eval, run.data.tokenizer
        fns = self._decoders(run)
        hyps = {"greedy": [], "beam": []} if beam else {"greedy": []}
        refs = []
        for batch in run.data.eval_batches(split, int(cfg.batch_size), max_examples=cfg.max_decode_examples):
            keep = np.asarray(batch["row_weight"]) > 0
            features, frames = run.put(batch["features"]), run.put(batch["num_frames"])
            for name in hyps:
                out = decode_lib.to_token_lists(
                    jax.device_get(fns[name](state, features, frames)), tok.eos_id
                )
                hyps[name] += [tok.decode(ids) for ids, k in zip(out, keep) if k]
            refs += [t for t, k in zip(batch["text"], keep) if k]
        metrics = {}
        for name, h in hyps.items():
            metrics.update({f"{split}_{name}_{k}": v for k, v in error_rates(h, refs).items()})
        for i in range(min(int(cfg.num_samples), len(refs))):
            print(
                f"--- {split} sample {i}\n  reference: {refs[i]}\n"
                + "".join(f"  {name}: {h[i]}\n" for name, h in hyps.items()),
                file=stream,
                end="",
                flush=True,
            )
        return metrics

    def predict_and_score(self, run, state, split: str = "test", *, beam: bool | None = None, stream=None):
        """WER / CER of greedy (and beam) decoding on every ``eval.decode_splits`` split, samples printed."""
        cfg = self.config.eval
        if not cfg.max_decode_examples:
            return {}
        beam = int(cfg.beam_size) > 0 if beam is None else beam
        metrics = {}
        for name in cfg.decode_splits:
            if name != "test":  # the loop evaluates validation and test itself
                metrics.update(run.evaluate(state, name, name))
            metrics.update(self.transcribe_split(run, state, name, beam=beam, stream=stream))
        return metrics

    def at_start(self, run, state, *, stream=None):
        """Greedy WER / CER of the untrained model on the decode splits (the step-0 reference)."""
        if not self.config.eval.get("decode_at_start") or not self.config.eval.max_decode_examples:
            return {}
        metrics = {}
        for name in self.config.eval.decode_splits:
            metrics.update(self.transcribe_split(run, state, name, beam=False, stream=stream))
        return metrics
