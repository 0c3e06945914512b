"""Image-classification and vision-language data: TFDS sources → Grain batches.

Classification (offline ``sklearn_digits``, or prepared TFDS ``cifar10`` / ``imagenet2012``)::

    data = make_image_data(config.data, data_dir=DIR)
    batch = next(data.train_iter(64, seed=0))   # {'image': float32[B, H, W, C] in [-1, 1], 'label': int32[B]}
    for batch in data.eval_batches('test', 64): # + 'row_weight' float32[B] (0 on padding rows)

Vision-language (offline ``shapes_scenes``, or prepared TFDS ``coco_captions``)::

    data = make_vlm_data(config.data, data_dir=DIR)
    batch = next(data.train_iter(64, seed=0))
    # {'image', 'text': int32[B, T] (inputs), 'targets': int32[B, T] (text shifted left),
    #  'token_weight': float32[B, T] (1 on the answer / caption tokens and EOS: the loss is on text only)}
    for batch in data.eval_batches('test', 64, kind='vqa'): # + 'prompt', 'prompt_len', 'target_text', ...

A training visit to a scene draws one task: its caption (probability ``caption_prob``) or one of its
question-answer pairs. Text is tokenized by :class:`WordTokenizer` (the scene language is a closed set of
~30 words, so words are the natural unit). Offline datasets are small and held in memory; real TFDS
datasets are read lazily through ``tfds.data_source`` (array_record, never downloaded here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from moe_jax.data.errors import DatasetUnavailableError

PAD_ID, UNK_ID, BOS_ID, EOS_ID, CAPTION_ID, QUESTION_ID, ANSWER_ID = range(7)
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<caption>", "<question>", "<answer>")
OFFLINE_CLASSIFICATION = ("sklearn_digits",)
OFFLINE_VLM = ("shapes_scenes",)
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _to_str(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(value: Any) -> list[str]:
    if isinstance(value, dict):  # a Sequence of dicts (coco_captions' 'captions': {'text': [...], 'id': ...})
        value = value["text"]
    if isinstance(value, str | bytes):
        return [_to_str(value)]
    return [_to_str(v) for v in value]


class WordTokenizer:
    """Lower-cased word-level tokenizer with the ids PAD 0, UNK 1, BOS 2, EOS 3 and three task markers.

    Args:
        words: the vocabulary after the specials, in id order.
    """

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, words: Sequence[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self._ids = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @staticmethod
    def split(text: str) -> list[str]:
        """Words and single punctuation marks of ``text`` (lower-cased)."""
        return _WORD_RE.findall(text.lower())

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 10_000, min_count: int = 1) -> WordTokenizer:
        """The ``max_size - 7`` most frequent words (ties alphabetical, so the result is deterministic)."""
        counts = Counter(w for t in texts for w in cls.split(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[: max(max_size - len(SPECIALS), 0)])

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text, stopping at EOS, skipping specials; punctuation is attached to the previous word."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= len(SPECIALS) and i < len(self.words):
                w = self.words[i]
                if out and not w[0].isalnum():
                    out[-1] += w
                else:
                    out.append(w)
        return " ".join(out)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.words, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> WordTokenizer:
        with open(path) as f:
            return cls(json.load(f))


def preprocess_image(
    image: np.ndarray, *, image_size: int, channels: int, field: str = "image"
) -> np.ndarray:
    """uint8 ``[h, w, c]`` → float32 ``[image_size, image_size, channels]`` in [-1, 1].

    Images of another size are centre-cropped to a square and resized (bilinear), so real datasets with
    varied sizes (ImageNet, COCO) batch together.

    Raises:
        ValueError: the channel count differs from ``channels`` (names ``field``).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(
            f"{field} has shape {image.shape} but the config expects channels={channels} "
            f"(set data.channels / model.channels to match the dataset)"
        )
    if image.shape[:2] != (image_size, image_size):
        from PIL import Image

        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = image[top : top + side, left : left + side]
        pil = Image.fromarray(crop[..., 0] if channels == 1 else crop)
        image = np.asarray(pil.resize((image_size, image_size), Image.BILINEAR)).reshape(
            image_size, image_size, channels
        )
    return image.astype(np.float32) * (2.0 / 255.0) - 1.0


def _read_all(source, indices: Sequence[int]) -> list[dict]:
    get_many = getattr(source, "__getitems__", None)
    try:
        return list(get_many(list(indices))) if get_many else [source[i] for i in indices]
    except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
        return [source[i] for i in indices]


def _tfds_source(name: str, split: str, data_dir: str):
    from moe_jax.data.pipeline import prepared_source

    return prepared_source(name, split, data_dir)


def _prepared_builder(name: str, data_dir: str, builder_config: str | None):
    from moe_jax.data.builders import digits, shapes_scenes

    cls = {"sklearn_digits": digits.SklearnDigits, "shapes_scenes": shapes_scenes.ShapesScenes}[name]
    kwargs = {"config": builder_config} if builder_config else {}
    builder = cls(data_dir=data_dir, file_format="array_record", **kwargs)
    builder.download_and_prepare()
    return builder


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads every array to ``batch_size`` rows (zeros) so compiled eval steps see one shape."""
    n = len(next(iter(batch.values())))
    return {
        k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) if n < batch_size else v
        for k, v in batch.items()
    }


# -- image classification ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageClassificationData:
    """Splits of ``(uint8 image, label)`` and the batching the vision loop uses.

    Attributes:
        sources: split name → random-access dicts with ``image`` and ``label``.
        image_size, channels, num_classes: what batches are shaped to.
        name: the dataset, for logs.
        num_threads: Grain reader threads for training batches.
        random_shift: training images are translated by up to this many pixels in each direction (filled
            with -1, the background of the normalised range); 0 turns augmentation off.
    """

    sources: dict[str, Any]
    image_size: int
    channels: int
    num_classes: int
    name: str = ""
    num_threads: int = 2
    random_shift: int = 0

    def _example(self, example: dict) -> dict[str, np.ndarray]:
        image = preprocess_image(example["image"], image_size=self.image_size, channels=self.channels)
        return {"image": image, "label": np.int32(example["label"])}

    def _augment(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        s = self.random_shift
        dy, dx = rng.integers(-s, s + 1, size=2)
        padded = np.pad(example["image"], ((s, s), (s, s), (0, 0)), constant_values=-1.0)
        H = self.image_size
        return {**example, "image": padded[s - dy : s - dy + H, s - dx : s - dx + H]}

    def train_iter(
        self, batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1
    ) -> grain.DatasetIterator:
        """Endless, checkpointable batches; each epoch a fresh seeded permutation."""
        dataset = grain.MapDataset.source(self.sources["train"])[shard_index::num_shards]
        if len(dataset) == 0:
            raise DatasetUnavailableError(f"{self.name}: the train split (shard {shard_index}) is empty")
        dataset = dataset.shuffle(seed=seed).repeat(None).map(self._example)
        if self.random_shift:
            dataset = dataset.random_map(self._augment, seed=seed)
        dataset = dataset.batch(batch_size, drop_remainder=True)
        options = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=4 * self.num_threads)
        return iter(dataset.to_iter_dataset(options))

    def eval_batches(
        self, split: str, batch_size: int, *, max_examples: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """A split once, in stored order; the last batch is padded with ``row_weight`` 0 rows."""
        source = self.sources[split]
        n = len(source) if not max_examples else min(max_examples, len(source))
        for start in range(0, n, batch_size):
            rows = [self._example(e) for e in _read_all(source, range(start, min(start + batch_size, n)))]
            batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "label")}
            batch["row_weight"] = np.ones(len(rows), np.float32)
            yield _pad_batch(batch, batch_size)


def make_image_data(data_config, *, data_dir: str) -> ImageClassificationData:
    """Classification data from ``config.data``.

    Fields: ``source`` (``sklearn_digits`` or a TFDS name such as ``cifar10``, ``imagenet2012``),
    ``builder_config``, ``image_size``, ``channels``, ``num_classes``, ``splits`` (train, validation, test
    names; e.g. ImageNet has no test labels, so its ``test`` is ``validation``), ``num_threads``,
    ``random_shift`` (training translation augmentation, pixels).

    Raises:
        DatasetUnavailableError: a TFDS dataset is not prepared (one line with the command that prepares it).
    """
    data_dir = os.path.expanduser(data_dir)
    split_names = dict(getattr(data_config, "splits", None) or {})
    if data_config.source in OFFLINE_CLASSIFICATION:
        builder = _prepared_builder(
            data_config.source, data_dir, getattr(data_config, "builder_config", None)
        )
        # 1.8k tiny images: holding them in memory makes batches ~10x cheaper than array_record reads.
        sources = {
            s: _read_all(src, range(len(src)))
            for s, src in (
                (s, builder.as_data_source(split_names.get(s, s))) for s in ("train", "validation", "test")
            )
        }
    else:
        sources = {
            s: _tfds_source(data_config.source, split_names.get(s, s), data_dir)
            for s in ("train", "validation", "test")
        }
    return ImageClassificationData(
        sources,
        int(data_config.image_size),
        int(data_config.channels),
        int(data_config.num_classes),
        name=data_config.source,
        num_threads=int(getattr(data_config, "num_threads", 2) or 2),
        random_shift=int(getattr(data_config, "random_shift", 0) or 0),
    )


# -- vision-language ---------------------------------------------------------------------------------------


def scene_record(example: dict, index: int = -1, split: str = "") -> dict:
    """Normalises a dataset example to ``{'image', 'captions', 'questions', 'answers'}`` (texts as str).

    Raises:
        ValueError: a caption is empty (names the field ``caption``, the example and the split).
    """
    captions = _texts(example["captions"] if "captions" in example else example["caption"])
    if not captions or any(not c.strip() for c in captions):
        raise ValueError(
            f"caption of example {index} in split {split!r} is empty; every example needs a non-empty caption"
        )
    questions = _texts(example.get("questions", []))
    answers = _texts(example.get("answers", []))
    if len(questions) != len(answers):
        raise ValueError(f"example {index}: {len(questions)} questions but {len(answers)} answers")
    return {"image": example["image"], "captions": captions, "questions": questions, "answers": answers}


def encode_task(
    tokenizer: WordTokenizer, kind: str, prompt: str, target: str, max_len: int
) -> dict[str, np.ndarray]:
    """One text example of a task as padded arrays.

    The full sequence is ``[BOS, <caption>] target [EOS]`` or ``[BOS, <question>] prompt [<answer>] target
    [EOS]``. ``text`` is the sequence without its last token, ``targets`` without its first; ``token_weight``
    marks the target words and EOS. Rows longer than ``max_len`` lose the end of the target.

    Returns:
        ``text``, ``targets`` (int32[max_len]), ``token_weight`` (float32[max_len]), ``prompt``
        (int32[max_len], the prompt alone), ``prompt_len`` (int32).
    """
    if kind == "caption":
        prompt_ids = [BOS_ID, CAPTION_ID]
    else:
        prompt_ids = [BOS_ID, QUESTION_ID, *tokenizer.encode(prompt), ANSWER_ID]
    prompt_ids = prompt_ids[:max_len]
    full = (prompt_ids + tokenizer.encode(target) + [EOS_ID])[: max_len + 1]
    out = {k: np.zeros(max_len, np.int32) for k in ("text", "targets", "prompt")}
    out["text"][: len(full) - 1] = full[:-1]
    out["targets"][: len(full) - 1] = full[1:]
    out["token_weight"] = np.zeros(max_len, np.float32)
    out["token_weight"][len(prompt_ids) - 1 : len(full) - 1] = 1.0
    out["prompt"][: len(prompt_ids)] = prompt_ids
    out["prompt_len"] = np.int32(len(prompt_ids))
    return out


@dataclasses.dataclass
class VLMData:
    """Scene splits, the word tokenizer and the batching the vision loop uses.

    Attributes:
        tokenizer: the word vocabulary.
        sources: split name → random-access raw examples (normalised by :func:`scene_record` on read).
        image_size, channels: what images are shaped to.
        max_text_len: T of every text array.
        caption_prob: chance that a training visit to a scene trains its caption rather than a question.
        name: the dataset, for logs.
        num_threads: Grain reader threads.
    """

    tokenizer: WordTokenizer
    sources: dict[str, Any]
    image_size: int
    channels: int
    max_text_len: int
    caption_prob: float = 0.3
    name: str = ""
    num_threads: int = 2

    def _record(self, split: str, index: int, example: dict) -> dict:
        record = scene_record(example, index, split)
        record["image"] = preprocess_image(
            record["image"], image_size=self.image_size, channels=self.channels
        )
        return record

    def _train_example(self, index_and_example, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, example = index_and_example
        r = self._record("train", index, example)
        if not r["questions"] or rng.random() < self.caption_prob:
            kind, prompt, target = "caption", "", r["captions"][rng.integers(len(r["captions"]))]
        else:
            q = int(rng.integers(len(r["questions"])))
            kind, prompt, target = "vqa", r["questions"][q], r["answers"][q]
        arrays = encode_task(self.tokenizer, kind, prompt, target, self.max_text_len)
        return {
            "image": r["image"],
            "text": arrays["text"],
            "targets": arrays["targets"],
            "token_weight": arrays["token_weight"],
        }

    def train_iter(
        self, batch_size: int, *, seed: int, shard_index: int = 0, num_shards: int = 1
    ) -> grain.DatasetIterator:
        """Endless, checkpointable batches of ``image``, ``text``, ``targets``, ``token_weight``."""
        source = self.sources["train"]
        dataset = grain.MapDataset.range(len(source))[shard_index::num_shards]
        if len(dataset) == 0:
            raise DatasetUnavailableError(f"{self.name}: the train split (shard {shard_index}) is empty")
        dataset = (
            dataset.shuffle(seed=seed)
            .repeat(None)
            .map(lambda i: (int(i), source[int(i)]))
            .random_map(self._train_example, seed=seed)
            .batch(batch_size, drop_remainder=True)
        )
        options = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=4 * self.num_threads)
        return iter(dataset.to_iter_dataset(options))

    def eval_items(self, split: str, kind: str, max_examples: int | None = None) -> Iterator[tuple]:
        """``(scene index, prompt, target, all references)`` of one task, in stored order.

        ``caption``: one item per scene (the first caption as target, all as references); ``vqa``: every
        question of every scene. ``max_examples`` caps the number of scenes.
        """
        source = self.sources[split]
        n = len(source) if not max_examples else min(max_examples, len(source))
        for start in range(0, n, 256):
            examples = _read_all(source, range(start, min(start + 256, n)))
            for i, example in enumerate(examples, start):
                r = scene_record(example, i, split)
                if kind == "caption":
                    yield i, "", r["captions"][0], r["captions"]
                else:
                    for q, a in zip(r["questions"], r["answers"]):
                        yield i, q, a, [a]

    def eval_batches(
        self, split: str, batch_size: int, *, max_examples: int | None = None, kind: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Fixed-shape batches of one task (``caption`` or ``vqa``; None: captions, then questions).

        ``max_examples`` caps each task's items.

        Yields:
            ``image``, ``text``, ``targets``, ``token_weight``, ``prompt``, ``prompt_len``,
            ``row_weight`` float32[B], and lists ``prompt_text``, ``target_text``, ``references``.
        """
        if kind is None:
            for each in ("caption", "vqa"):
                yield from self.eval_batches(split, batch_size, max_examples=max_examples, kind=each)
            return
        if kind not in ("caption", "vqa"):
            raise ValueError(f"kind={kind!r} must be 'caption' or 'vqa'")
        source = self.sources[split]
        items = list(self.eval_items(split, kind, max_examples))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rows = []
            for index, prompt, target, _ in chunk:
                image = preprocess_image(
                    source[index]["image"], image_size=self.image_size, channels=self.channels
                )
                rows.append(
                    {"image": image, **encode_task(self.tokenizer, kind, prompt, target, self.max_text_len)}
                )
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            batch["row_weight"] = np.ones(len(rows), np.float32)
            batch = _pad_batch(batch, batch_size)
            pad = batch_size - len(chunk)
            batch["prompt_text"] = [c[1] for c in chunk] + [""] * pad
            batch["target_text"] = [c[2] for c in chunk] + [""] * pad
            batch["references"] = [c[3] for c in chunk] + [[""]] * pad
            yield batch


def make_vlm_data(data_config, *, data_dir: str) -> VLMData:
    """Vision-language data from ``config.data``.

    Fields: ``source`` (``shapes_scenes`` or a TFDS name such as ``coco_captions``), ``builder_config``,
    ``image_size``, ``channels``, ``max_text_len``, ``vocab_size`` (word vocabulary cap), ``caption_prob``,
    ``splits`` (name mapping, e.g. COCO's ``validation`` is ``val``), ``tokenizer_train_examples``.

    The word vocabulary is built from the train split's texts (the scene language's vocabulary is closed)
    and cached under ``data_dir/tokenizers`` for TFDS datasets, whose texts are slow to scan.

    Raises:
        DatasetUnavailableError: a TFDS dataset is not prepared.
        ValueError: an empty caption (names the field).
    """
    data_dir = os.path.expanduser(data_dir)
    split_names = dict(getattr(data_config, "splits", None) or {})
    vocab_size = int(getattr(data_config, "vocab_size", 10_000) or 10_000)
    if data_config.source in OFFLINE_VLM:
        builder = _prepared_builder(
            data_config.source, data_dir, getattr(data_config, "builder_config", None)
        )
        sources = {
            s: _read_all(src, range(len(src)))
            for s, src in (
                (s, builder.as_data_source(split_names.get(s, s))) for s in ("train", "validation", "test")
            )
        }
        records = (scene_record(e, i, "train") for i, e in enumerate(sources["train"]))
        texts = (t for r in records for t in (*r["captions"], *r["questions"], *r["answers"]))
        tokenizer = WordTokenizer.build(texts, vocab_size)
    else:
        sources = {
            s: _tfds_source(data_config.source, split_names.get(s, s), data_dir)
            for s in ("train", "validation", "test")
        }
        path = os.path.join(
            data_dir, "tokenizers", data_config.source.replace("/", "_"), f"words_v{vocab_size}.json"
        )
        if os.path.exists(path):
            tokenizer = WordTokenizer.load(path)
        else:
            train = sources["train"]
            n = min(len(train), int(getattr(data_config, "tokenizer_train_examples", 20_000) or 20_000))
            records = (scene_record(e, i, "train") for i, e in enumerate(_read_all(train, range(n))))
            tokenizer = WordTokenizer.build((t for r in records for t in r["captions"]), vocab_size)
            tokenizer.save(path)
    return VLMData(
        tokenizer,
        sources,
        int(data_config.image_size),
        int(data_config.channels),
        int(data_config.max_text_len),
        float(getattr(data_config, "caption_prob", 0.3)),
        name=data_config.source,
        num_threads=int(getattr(data_config, "num_threads", 2) or 2),
    )
