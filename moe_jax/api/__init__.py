"""The quick API: ``SparseMoeModel`` trains sparse Mixture-of-Experts Transformers on in-memory data.

Four model families sit behind one class, one module each:

* Sequence-to-sequence (``task='translation' | 'summarization' | 'seq2seq'``, :mod:`moe_jax.api.seq2seq`):
  lists of input and target strings; the project's encoder-decoder, trained by the trainer's own step and
  decoded greedily.
* Language modelling (``task='language_modeling'``, :mod:`moe_jax.api.lm`): a list of documents (strings);
  the project's decoder-only :class:`~moe_jax.models.DecoderLM` over a byte-fallback SentencePiece
  vocabulary, trained by the trainer's own step on packed rows; ``predict(prompts, max_new_tokens=32,
  temperature=0.0, top_k=0, top_p=1.0, seed=0)`` returns each prompt's continuation, generated with the KV
  cache (greedy, or sampled). Routing is dropless unless ``capacity_factor`` is given.
* Feature classification (``task='classification'``, :mod:`moe_jax.api.features`): NumPy features
  ``[N, F]`` or ``[N, L, F]`` and labels ``[N]``, through a
  :class:`~moe_jax.models.feature_classifier.FeatureClassifier`.
* Image classification (``task='image_classification'``, :mod:`moe_jax.api.vision`): NumPy images
  ``[N, H, W, C]`` (uint8 or float) and labels ``[N]``, through the V-MoE
  :class:`~moe_jax.models.vit.ViTClassifier` and the vision trainer's step.

* Speech recognition (``task='speech_recognition'``, :mod:`moe_jax.api.speech`): a list of 1-D waveforms
  (float or int16 samples, any lengths) and their transcripts, ``sample_rate=`` in Hz; log-mel features,
  SpecAugment, convolutional subsampling and an MoE encoder-decoder over characters
  (:class:`~moe_jax.models.speech.SpeechTransformer`); ``predict(waveforms)`` returns strings.

All run on one device (no mesh); everything else (mesh, checkpoints, logging) is the job of
``python -m moe_jax.main``. Unless overridden, every Transformer block's FFN is an MoE layer.

Bad input is a ``ValueError`` naming the argument (and the index of the first bad example) or, for
``load``, the file and what is wrong with it, raised before any training or use
(:mod:`moe_jax.api.saved`; catalogue: ``tests/test_bad_inputs_api.py``). ``predict`` or ``save`` before
``train`` raise :class:`NotTrainedError`, a ``ValueError`` that is also a ``RuntimeError``.
"""

from moe_jax.api._common import NotTrainedError
from moe_jax.api.model import TASKS, SparseMoeModel
from moe_jax.models.feature_classifier import FeatureClassifier

__all__ = ["FeatureClassifier", "NotTrainedError", "SparseMoeModel", "TASKS"]
