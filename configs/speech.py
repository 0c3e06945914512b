"""Speech recognition with a sparse-MoE encoder-decoder on speech synthesised offline by espeak-ng.

Run (CPU, offline; needs the espeak-ng program: ``apt-get install espeak-ng``; the corpus is synthesised and
prepared as array_record on first use, about a minute on 2 cores)::

    python -m moe_jax.main --config=configs/speech.py --workdir=runs/speech

Log-mel features (80 bins, 25 ms / 10 ms, librosa), SpecAugment in training, two stride-2 convolutions
(4× subsampling), sinusoidal positions, a Transformer encoder and an attention decoder over characters,
both with MoE FFNs in every other block, and a CTC head on the encoder (joint CTC-attention training).
Reports validation loss / token accuracy, and greedy + beam WER and CER (jiwer) on the held-out sentences
(``test_*``, training voices) and on the same sentences spoken by a held-out voice (``test_voice_*``), at
step 0 and at the end, with sample transcripts.

Variants (``--config=configs/speech.py:VARIANT``):
    default: ``espeak_speech/small`` (2,600 gettext sentences of 2-6 words, 85/5/10% by sentence; 2
        utterances per training sentence from 16 voices = 4 accents × 4 variants, rates 150-210 wpm, 3
        pitches, clean or white noise at 30/20/10 dB SNR; the held-out voice is en-gb-x-gbcwmd+f4;
        length-bucketed training batches padded to 144, 208, 272 or 352 frames);
        d_model 128, 4 encoder + 3 decoder blocks, MoE (8 experts, top-2, capacity 1.25) in encoder
        blocks 1 and 3 and decoder block 1; CTC weight 0.3; batch 32; 1,200 steps. Hardware: 2 CPU cores.
        Time: measured 12 min 57 s wall with the corpus prepared inside the run (training 567 s).
        Expected: measured test WER 46.2 beam / 55.9 greedy, held-out voice 61.5 / 74.4, from 100 at step
        0 (README speech section; raw output in ``experiments/results/speech_default/``).
    smoke: ``espeak_speech/tiny`` and a tiny model for a few steps (tests; seconds).
    librispeech: LibriSpeech ``train_clean100`` → ``dev_clean`` / ``test_clean`` and
        ``test_other``, 1,024 SentencePiece pieces, d_model 256, 12 + 6 blocks, 16 experts top-2, bf16.
        Needs the TFDS data prepared once (``pip install 'moe_jax[tf]' && tfds build librispeech
        --file_format=array_record``; TFDS's librispeech builder itself needs TensorFlow and Apache Beam).
        Hardware: 8 accelerators. Expected: not run here (no LibriSpeech on our machines); attention
        encoder-decoders of this size usually reach ~6-10% WER on test-clean after 100 h.
"""

import ml_collections

from moe_jax import config_lib


def get_config(variant: str = "default"):
    c = config_lib.base_config()
    c.task = "speech_recognition"

    c.data = ml_collections.ConfigDict()
    c.data.source = "espeak_speech"
    c.data.builder_config = "small"
    # Role -> split name; the decode splits below name roles.
    c.data.splits = ml_collections.ConfigDict(
        {"train": "train", "validation": "validation", "test": "test", "test_voice": "test_voice"}
    )
    c.data.sample_rate = 16_000
    c.data.num_mel_bins = 80
    c.data.max_frames = 352  # 3.5 s at a 10 ms hop; the longest small-corpus utterance is 3.3 s
    # Length-bucketed training batches (the mean utterance is 1.7 s): padded to 204 frames on average instead
    # of 352, at the cost of one compile per bucket. Evaluation always pads to max_frames.
    c.data.frame_buckets = (144, 208, 272)
    c.data.bucket_window = 32  # batches whose utterances are sorted by length together
    c.data.max_target_len = 44  # 40 characters, the leading space piece and EOS
    c.data.vocab_size = 64  # a character vocabulary has ~30 pieces; the size only caps it
    c.data.tokenizer_model_type = "char"
    c.data.tokenizer_train_examples = 50_000
    c.data.lowercase = True
    c.data.num_threads = 2

    # Fields of moe_jax.models.speech.SpeechConfig (vocab_size comes from the tokenizer).
    c.model = ml_collections.ConfigDict()
    c.model.num_mel_bins = c.data.get_ref("num_mel_bins")
    c.model.conv_channels = 16  # 32 made the convolutions 4x slower on CPU (0.26 vs 0.06 s fwd+bwd)
    c.model.conv_layers = 2
    c.model.freq_masks = 2
    c.model.freq_mask_width = 10
    c.model.time_masks = 2
    c.model.time_mask_width = 20
    c.model.time_mask_ratio = 0.2
    # Joint CTC-attention training (the CTC head on the encoder, 30% of the training loss). A 1,500-step
    # trial without it (and without absolute positions, at 8x subsampling) learned a language model of the
    # transcripts and ignored the audio; the three changes together fixed that (not ablated one by one).
    c.model.ctc_weight = 0.3
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.head_dim = None
    c.model.d_ff = 256
    c.model.num_encoder_layers = 4
    c.model.num_decoder_layers = 3
    c.model.activation = "swiglu"
    c.model.norm = "rmsnorm"
    c.model.positions = "rope"
    c.model.max_len = 512
    c.model.tie_embeddings = True
    c.model.dropout_rate = 0.1
    c.model.remat_policy = "none"
    c.model.scan_layers = False
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    # layers=None: blocks 1, 3, ... of each stack. One routing group per utterance (group_size None), so a
    # transcript never depends on the other utterances of its batch.
    c.model.moe = config_lib.moe_section(
        num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0
    )

    c.optim.update(learning_rate=1.5e-3, warmup_steps=150, b2=0.98)
    c.train.update(
        batch_size=32,
        num_train_steps=1200,
        log_every=50,
        eval_every=600,
        checkpoint_every=600,
        tensorboard=False,
    )
    c.eval.update(
        batch_size=64,
        max_eval_examples=500,
        max_decode_examples=260,
        beam_size=4,
        length_penalty=0.6,
        num_samples=3,
        decode_at_start=True,
    )
    c.eval.decode_splits = ("test", "test_voice")

    if variant in ("default", "", None):
        pass
    elif variant == "smoke":
        c.data.builder_config = "tiny"
        c.data.update(num_mel_bins=40, max_frames=240, max_target_len=24, frame_buckets=(160,))
        c.model.update(
            conv_channels=8, d_model=32, num_heads=2, d_ff=64, num_encoder_layers=2, num_decoder_layers=2
        )
        c.model.update(freq_mask_width=5, time_mask_width=10)
        c.model.moe.update(num_experts=4, top_k=2)
        c.optim.update(learning_rate=3e-3, warmup_steps=2)
        c.train.update(batch_size=8, num_train_steps=4, log_every=1, eval_every=2, checkpoint_every=2)
        c.eval.update(batch_size=8, max_eval_examples=8, max_decode_examples=8, beam_size=2, num_samples=1)
    elif variant == "librispeech":
        c.data.source = "librispeech"
        c.data.builder_config = None
        c.data.splits = ml_collections.ConfigDict(
            {
                "train": "train_clean100",
                "validation": "dev_clean",
                "test": "test_clean",
                "test_other": "test_other",
            }
        )
        c.data.update(max_frames=1700, max_target_len=160, vocab_size=1024, tokenizer_model_type="unigram")
        c.data.frame_buckets = (400, 800, 1200)  # LibriSpeech utterances average about 12 s
        c.model.update(
            conv_channels=128,
            freq_mask_width=27,
            time_mask_width=100,
            time_mask_ratio=0.05,
            d_model=256,
            num_heads=4,
            d_ff=1024,
            num_encoder_layers=12,
            num_decoder_layers=6,
            max_len=2048,
            dtype="bfloat16",
        )
        c.model.moe.update(num_experts=16, top_k=2)
        c.loss.label_smoothing = 0.1
        c.optim.update(learning_rate=1e-3, warmup_steps=4000, weight_decay=0.01)
        c.train.update(
            batch_size=256, num_train_steps=100_000, log_every=100, eval_every=5000, checkpoint_every=5000
        )
        c.eval.update(batch_size=64, max_eval_examples=3000, max_decode_examples=3000, max_decode_len=200)
        c.eval.decode_splits = ("test", "test_other")
    else:
        raise ValueError(f"unknown variant {variant!r}; choose default, smoke or librispeech")
    return c
