"""Speech recognizer: log-mel frames → conv subsampling → MoE Transformer encoder → MoE attention decoder.

The encoder input is a batch of log-mel frames ``features_BTF`` (computed on the host with librosa,
``moe_jax/data/speech.py``) with the real frame count of each row ``num_frames_B``. In training
(``deterministic=False`` with a ``dropout_key``) SpecAugment masks frequency bands and time spans of the
real frames (:func:`spec_augment`); evaluation and decoding never mask. Two stride-2 3×3 convolutions
(:class:`ConvSubsampling`) cut the frame rate by 4 (100 → 25 frames/s at a 10 ms hop) before the encoder
blocks, which use RoPE over the subsampled positions. The decoder is the encoder-decoder's own (causal
self-attention, cross-attention to the encoder frames, MoE FFNs with causal routing) over characters or
SentencePiece pieces; greedy and beam decoding are the shared ones (``moe_jax/train/decode.py``).

Shape letters: ``moe_jax/moe/__init__.py`` plus T input frames, F mel bins, K encoder frames after
subsampling, C conv channels.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import sharding
from moe_jax.models import config as config_lib
from moe_jax.models.config import MoeConfig
from moe_jax.models.layers import dropout
from moe_jax.models.transformer import ModelConfig, Seq2SeqTransformer, shift_right


@dataclasses.dataclass(frozen=True)
class SpeechConfig(ModelConfig):
    """Architecture of the speech recognizer (``config.model``): :class:`ModelConfig` plus the front end.

    Attributes:
        num_mel_bins: F, log-mel bins per input frame (from ``config.data``).
        conv_channels: C, channels of both subsampling convolutions.
        conv_layers: stride-2 convolutions (each halves the frame rate; 2 is the usual 4× subsampling).
        freq_masks, freq_mask_width: SpecAugment frequency masks per utterance and their largest width (bins).
        time_masks, time_mask_width: time masks per utterance and their largest width (input frames); a
            mask never exceeds ``time_mask_ratio`` of the utterance's real frames.
        time_mask_ratio: cap of one time mask relative to the utterance length (SpecAugment's p).
        ctc_weight: weight λ of a CTC loss on the encoder (a linear head over the same vocabulary, blank =
            pad id 0) in training: loss = (1 − λ)·attention CE + λ·CTC, both per target token (joint
            CTC-attention training, Kim et al. 2017: the CTC term forces monotonic alignments early, which
            the attention decoder alone learns slowly). 0 builds no head.

    ``vocab_size`` and the Transformer fields are :class:`ModelConfig`'s; ``max_len`` bounds learned
    positions only (the default RoPE has no bound).
    """

    num_mel_bins: int = 80
    conv_channels: int = 16
    conv_layers: int = 2
    freq_masks: int = 2
    freq_mask_width: int = 10
    time_masks: int = 2
    time_mask_width: int = 20
    time_mask_ratio: float = 0.2
    ctc_weight: float = 0.0

    _sections: ClassVar[dict[str, type]] = {"moe": MoeConfig}

    def __post_init__(self):
        super().__post_init__()
        config_lib.check_int("num_mel_bins", self.num_mel_bins, 1)
        config_lib.check_int("conv_channels", self.conv_channels, 1)
        config_lib.check_int("conv_layers", self.conv_layers, 0)
        for name in ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width"):
            config_lib.check_int(name, getattr(self, name), 0)
        ratio = self.time_mask_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
            from moe_jax.errors import ConfigError

            raise ConfigError(f"time_mask_ratio={ratio!r} must be in [0, 1]")
        w = self.ctc_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w < 1.0:
            from moe_jax.errors import ConfigError

            raise ConfigError(f"ctc_weight={w!r} must be in [0, 1)")


def subsampled_lengths(num_frames_B: jax.Array, conv_layers: int) -> jax.Array:
    """Frames left after ``conv_layers`` stride-2 'SAME' convolutions: ceil(n / 2) each time."""
    n_B = num_frames_B.astype(jnp.int32)
    for _ in range(conv_layers):
        n_B = (n_B + 1) // 2
    return n_B


def sinusoidal_positions(length: int, d_model: int) -> jax.Array:
    """The Transformer's absolute sinusoidal encodings ``[L, D]`` (sin on even, cos on odd channels)."""
    pos_L1 = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv_H = jnp.exp(-jnp.log(10_000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    out_LD = jnp.zeros((length, d_model), jnp.float32)
    out_LD = out_LD.at[:, 0::2].set(jnp.sin(pos_L1 * inv_H))
    return out_LD.at[:, 1::2].set(jnp.cos(pos_L1 * inv_H[: d_model // 2]))


def spec_augment(
    features_BTF: jax.Array,
    num_frames_B: jax.Array,
    key: jax.Array,
    *,
    freq_masks: int,
    freq_mask_width: int,
    time_masks: int,
    time_mask_width: int,
    time_mask_ratio: float,
) -> jax.Array:
    """SpecAugment (Park et al., 2019) without time warping: masked bins and frames are set to 0.

    Each utterance draws its own masks: a frequency mask is ``[f0, f0 + f)`` with ``f`` uniform in
    ``[0, freq_mask_width]`` and ``f0`` uniform in ``[0, F - f]``; a time mask is ``[t0, t0 + t)`` with
    ``t`` uniform in ``[0, min(time_mask_width, time_mask_ratio · n)]`` over the row's ``n`` real frames.
    The features are per-utterance normalised, so 0 is the mean (what the paper's masks use).
    """
    B, T, F = features_BTF.shape
    kf, kt = jax.random.split(key)
    keep_BTF = jnp.ones((B, T, F), bool)
    if freq_masks and freq_mask_width:
        kw, ks = jax.random.split(kf)
        width_BM = jax.random.randint(kw, (B, freq_masks), 0, min(freq_mask_width, F) + 1)
        start_BM = (jax.random.uniform(ks, (B, freq_masks)) * (F - width_BM + 1)).astype(jnp.int32)
        f_F = jnp.arange(F)
        hit_BMF = (f_F >= start_BM[..., None]) & (f_F < (start_BM + width_BM)[..., None])
        keep_BTF &= ~jnp.any(hit_BMF, axis=1)[:, None, :]
    if time_masks and time_mask_width:
        kw, ks = jax.random.split(kt)
        n_B = num_frames_B.astype(jnp.float32)
        cap_B = jnp.minimum(float(time_mask_width), jnp.floor(time_mask_ratio * n_B))
        width_BM = jnp.floor(jax.random.uniform(kw, (B, time_masks)) * (cap_B[:, None] + 1)).astype(jnp.int32)
        room_BM = jnp.maximum(num_frames_B[:, None].astype(jnp.int32) - width_BM + 1, 1)
        start_BM = (jax.random.uniform(ks, (B, time_masks)) * room_BM).astype(jnp.int32)
        t_T = jnp.arange(T)
        hit_BMT = (t_T >= start_BM[..., None]) & (t_T < (start_BM + width_BM)[..., None])
        keep_BTF &= ~jnp.any(hit_BMT, axis=1)[:, :, None]
    return jnp.where(keep_BTF, features_BTF, jnp.zeros_like(features_BTF))


class ConvSubsampling(nnx.Module):
    """``conv_layers`` 3×3 stride-2 convolutions with ReLU over (time, mel), then a projection to D.

    Input ``[B, T, F]`` → ``[B, K, D]`` with K = T halved (rounded up) per layer. Padding frames past a row's
    length are zeroed before every convolution, so a row's output does not depend on how far it is padded.
    """

    def __init__(self, cfg: SpeechConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.param_dtype)
        self.dtype, self.layers = jnp.dtype(cfg.dtype), cfg.conv_layers
        init = nnx.initializers.he_normal()
        kernels, biases = [], []
        channels, freq = 1, cfg.num_mel_bins
        for _ in range(cfg.conv_layers):
            kernels.append(sharding.param(init(rngs.params(), (3, 3, channels, cfg.conv_channels), dt), None))
            biases.append(sharding.param(jnp.zeros((cfg.conv_channels,), dt), None))
            channels, freq = cfg.conv_channels, (freq + 1) // 2
        self.kernels, self.biases = nnx.List(kernels), nnx.List(biases)
        self.proj = sharding.param(
            nnx.initializers.lecun_normal()(rngs.params(), (channels * freq, cfg.d_model), dt),
            (None, "embed"),
        )

    def __call__(self, features_BTF: jax.Array, num_frames_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(x_BKD, num_frames_B after subsampling)``."""
        x = features_BTF.astype(self.dtype)[..., None]  # [B, T, F, 1]
        n_B = num_frames_B.astype(jnp.int32)
        for kernel, bias in zip(self.kernels, self.biases):
            x = jnp.where((jnp.arange(x.shape[1]) < n_B[:, None])[:, :, None, None], x, 0)
            x = jax.lax.conv_general_dilated(
                x,
                kernel[...].astype(self.dtype),
                window_strides=(2, 2),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            x = jax.nn.relu(x + bias[...].astype(self.dtype))
            n_B = (n_B + 1) // 2
        B, K = x.shape[:2]
        x_BKD = jnp.einsum("bkc,cd->bkd", x.reshape(B, K, -1), self.proj[...].astype(self.dtype))
        return x_BKD, n_B


class SpeechTransformer(Seq2SeqTransformer):
    """Attention-based speech recognizer with MoE FFNs in the encoder and the decoder.

    The text side (token embedding, decoder stack, tied output head, :meth:`decode`, :meth:`logits`) is the
    :class:`~moe_jax.models.Seq2SeqTransformer`'s; the encoder reads log-mel frames through
    :class:`ConvSubsampling` instead of token embeddings. :meth:`decode` takes the encoder's frame mask in
    place of the text model's source ids (only ``!= 0`` of them is used: the cross-attention pad mask).

    Args:
        cfg: the architecture.
        bos_id: token that starts every decoder input.
        rngs: initialisation randomness.
    """

    def __init__(self, cfg: SpeechConfig, *, bos_id: int = 2, rngs: nnx.Rngs):
        super().__init__(cfg, bos_id=bos_id, rngs=rngs)
        self.frontend = ConvSubsampling(cfg, rngs=rngs)
        self.ctc_head = (
            sharding.param(
                nnx.initializers.lecun_normal()(
                    rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype)
                ),
                ("embed", "vocab"),
            )
            if cfg.ctc_weight > 0
            else None
        )

    def encode_features(
        self, features_BTF, num_frames_B, *, dropout_key=None, deterministic=True
    ) -> tuple[jax.Array, jax.Array, dict]:
        """Returns ``(enc_BKD, enc_mask_BK, aux)``; SpecAugment only when training with a key."""
        cfg = self.cfg
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        if not deterministic and keys[0] is not None:
            features_BTF = spec_augment(
                features_BTF,
                num_frames_B,
                keys[0],
                freq_masks=cfg.freq_masks,
                freq_mask_width=cfg.freq_mask_width,
                time_masks=cfg.time_masks,
                time_mask_width=cfg.time_mask_width,
                time_mask_ratio=cfg.time_mask_ratio,
            )
        x_BKD, n_B = self.frontend(features_BTF, num_frames_B)
        mask_BK = jnp.arange(x_BKD.shape[1])[None, :] < n_B[:, None]
        # Absolute positions as well as the encoder's RoPE: cross-attention has no RoPE, and without them
        # nothing tells the decoder where in the utterance a frame is. (A trial with RoPE only, no CTC and
        # 8x subsampling learned a language model of the transcripts and ignored the audio; which of the
        # three changes fixed it was not separated.)
        x_BKD = x_BKD + sinusoidal_positions(x_BKD.shape[1], cfg.d_model).astype(x_BKD.dtype)[None]
        x_BKD = dropout(x_BKD, cfg.dropout_rate, keys[1])
        positions_BK = jnp.broadcast_to(jnp.arange(x_BKD.shape[1], dtype=jnp.int32), mask_BK.shape)
        enc_BKD, aux = self.encoder(
            x_BKD,
            attn_mask_BLL=mask_BK[:, None, :] & mask_BK[:, :, None],
            positions_BL=positions_BK,
            mask_BL=mask_BK,
            dropout_key=keys[1],
            deterministic=deterministic,
        )
        return enc_BKD, mask_BK, aux

    def ctc_loss(self, enc_BKD, mask_BK, targets_BL, eos_id: int) -> jax.Array:
        """Per-utterance CTC loss ``[B]`` of the targets (EOS and pad left out; blank = 0).

        An utterance with fewer encoder frames than its labels need cannot be aligned; its loss is 0.
        """
        import optax

        logits_BKV = jnp.einsum(
            "bkd,dv->bkv",
            enc_BKD,
            self.ctc_head[...].astype(enc_BKD.dtype),
            preferred_element_type=jnp.float32,
        )
        labels_BL = jnp.where(targets_BL == eos_id, 0, targets_BL)
        label_pad_BL = (labels_BL == 0).astype(jnp.float32)
        loss_B = optax.ctc_loss(
            logits_BKV, 1.0 - mask_BK.astype(jnp.float32), labels_BL, label_pad_BL, blank_id=0
        )
        repeats_B = jnp.sum((labels_BL[:, 1:] == labels_BL[:, :-1]) & (labels_BL[:, 1:] != 0), axis=1)
        feasible_B = mask_BK.sum(1) >= (labels_BL != 0).sum(1) + repeats_B
        return jnp.where(feasible_B, loss_B, 0.0)

    def __call__(
        self,
        features_BTF,
        num_frames_B,
        targets_BL,
        *,
        dropout_key=None,
        deterministic=True,
        eos_id: int | None = None,
    ):
        """Teacher-forced logits for ``targets_BL`` (pad 0): ``(logits_BLV, aux)``.

        With ``eos_id`` and a CTC head, ``aux`` also holds ``"ctc": {"loss_B": [B]}`` (not a MoE layer:
        the task pops it before the train step sums the routing losses).
        """
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        enc_BKD, mask_BK, enc_aux = self.encode_features(
            features_BTF, num_frames_B, dropout_key=keys[0], deterministic=deterministic
        )
        if self.ctc_head is not None and eos_id is not None:
            enc_aux = {**enc_aux, "ctc": {"loss_B": self.ctc_loss(enc_BKD, mask_BK, targets_BL, eos_id)}}
        logits_BLV, dec_aux = self.decode(
            shift_right(targets_BL, self.bos_id),
            enc_BKD,
            mask_BK,
            decoder_mask_BL=targets_BL != 0,
            dropout_key=keys[1],
            deterministic=deterministic,
        )
        return logits_BLV, {**enc_aux, **dec_aux}
