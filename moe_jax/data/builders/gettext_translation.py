"""TFDS builder: English -> X translation pairs from the machine's gettext message catalogs.

Every Linux machine with localized packages holds thousands of human-translated software messages in
``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``. This builder reads them (never downloading anything),
cleans away what is formatting rather than language (printf and brace directives, keyboard accelerator
markers, markup, line breaks), filters by length, deduplicates and splits by a hash of the English text.

Prepare::

    GettextTranslation(config='en_de', data_dir=DIR, file_format='array_record').download_and_prepare()
"""

from __future__ import annotations

import dataclasses
import glob
import html
import os
import re

import tensorflow_datasets as tfds

from moe_jax.data.builders import common, mo_file
from moe_jax.data.errors import DatasetUnavailableError

DEFAULT_LOCALE_DIR = "/usr/share/locale"
DEFAULT_MIN_PAIRS = 1000
ALTERNATIVES = (
    "use --config=configs/summarization.py (offline docstrings) or a prepared TFDS dataset such as "
    "--config=configs/translation.py:wmt14_de_en"
)

# printf (C, Python %-style, positional %1$s, Qt %1, glibc %<PRId64>), brace ({0}, {name!r:>4}) and shell
# (${var}) directives carry no language; the model would only learn to copy them.
_DIRECTIVE_RE = re.compile(
    r"%(?:\d+\$)?(?:\([^)\s]*\))?[-+#0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?(?:hh|ll|[hlLqjzt])?"
    r"[diouxXeEfFgGaAcspnm]"
    r"|%<[A-Za-z0-9_]+>"
    r"|%\d+"
    r"|\{[^{}\s]*\}"
    r"|\$\{[^{}\s]*\}"
)
_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Quote or bracket pairs left empty once a directive is removed: `%s' -> `' -> nothing.
_EMPTY_PAIR_RE = re.compile(r"""[`'"«»„“”‚‘’‹›]\s*[`'"«»„“”‚‘’‹›]|\(\s*\)|\[\s*\]""")
# Only punctuation that ends a word: ".po" in "a .po file" keeps its space.
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,.;:!?)\]])(?=\s|$)")
_SPACE_AFTER_OPEN_RE = re.compile(r"([(\[])\s+")
_LETTER_RE = re.compile(r"[^\W\d_]")


@dataclasses.dataclass(eq=False)
class GettextTranslationConfig(tfds.core.BuilderConfig):
    """Which catalogs to pair and how to filter them.

    Attributes:
      locale_subdirs: directories under the locale dir whose ``LC_MESSAGES/*.mo`` hold the target language.
      min_words: minimum words in source and target.
      max_words: maximum words in source and target (long help texts are dropped, not truncated).
      keep_identical: keep pairs whose target equals the source. Off by default: ~10k of the German pairs
        are ISO language and region names copied verbatim, which would teach a small model to copy.
    """

    locale_subdirs: tuple[str, ...] = ("de",)
    min_words: int = 1
    max_words: int = 60
    keep_identical: bool = False


_LANGUAGES = {
    "de": ("de",),
    "fr": ("fr",),
    "es": ("es",),
    "it": ("it",),
    "ru": ("ru",),
    "ja": ("ja",),
    "pt_br": ("pt_BR",),
}


def clean_message(text: str) -> str:
    """Strips formatting noise from one catalog message and normalizes whitespace.

    Args:
      text: a raw msgid or msgstr.

    Returns:
      The cleaned text; possibly empty (a message made only of directives).
    """
    text = _CONTROL_RE.sub(" ", text)
    # Directives first: %<PRId64> would otherwise be taken for a markup tag.
    text = _DIRECTIVE_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = text.replace("%%", "%")
    text = html.unescape(text)
    # A single mnemonic marker is an accelerator (GTK "_Open", translated "Ö_ffnen"; Qt "&File"); several
    # underscores are an identifier such as NO_PROXY and stay.
    if text.count("_") == 1:
        text = re.sub(r"_(?=\w)", "", text)
    if text.count("&") == 1:
        text = re.sub(r"&(?=\w)", "", text)
    text = _EMPTY_PAIR_RE.sub("", text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN_RE.sub(r"\1", text)
    return text.strip()


def _usable(source: str, target: str, config: GettextTranslationConfig) -> bool:
    min_words, max_words = config.min_words, config.max_words
    if not (_LETTER_RE.search(source) and _LETTER_RE.search(target)):
        return False
    n_src, n_tgt = len(source.split()), len(target.split())
    if not (min_words <= n_src <= max_words and min_words <= n_tgt <= max_words):
        return False
    return config.keep_identical or source != target


def catalog_files(locale_dir: str, locale_subdirs: tuple[str, ...]) -> list[str]:
    """Lists the ``.mo`` files of a language, sorted so the walk order never depends on the filesystem."""
    files = []
    for sub in locale_subdirs:
        files.extend(glob.glob(os.path.join(locale_dir, sub, "LC_MESSAGES", "*.mo")))
    return sorted(files)


def load_pairs(
    locale_dir: str, config: GettextTranslationConfig
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Reads, cleans, filters and deduplicates all pairs of one language.

    Args:
      locale_dir: the directory holding ``<lang>/LC_MESSAGES``.
      config: the language and filters.

    Returns:
      (pairs sorted by text, statistics: catalogs, raw entries, kept pairs).
    """
    files = catalog_files(locale_dir, config.locale_subdirs)
    pairs: set[tuple[str, str]] = set()
    raw = 0
    for path in files:
        for msgid, msgstr in mo_file.read_mo(path):
            raw += 1
            source, target = clean_message(msgid), clean_message(msgstr)
            if _usable(source, target, config):
                pairs.add((source, target))
    # Sorting makes the result independent of the order catalogs happen to be read in.
    return sorted(pairs), {"catalogs": len(files), "raw_entries": raw, "pairs": len(pairs)}


class GettextTranslation(tfds.core.GeneratorBasedBuilder):
    """English -> target-language message pairs from local gettext catalogs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        GettextTranslationConfig(
            name=f"en_{lang}",
            description=f"English -> {subdirs[0]} gettext messages.",
            locale_subdirs=subdirs,
        )
        for lang, subdirs in _LANGUAGES.items()
    ]
    DEFAULT_CONFIG_NAME = "en_de"

    def __init__(self, *, locale_dir: str | None = None, min_pairs: int = DEFAULT_MIN_PAIRS, **kwargs):
        """Creates the builder.

        Args:
          locale_dir: where the catalogs live (default ``/usr/share/locale``); tests point it at a temp dir.
            It is not part of the dataset identity: prepare different locale dirs into different data dirs.
          min_pairs: fewer usable pairs than this raises :class:`DatasetUnavailableError`.
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``, ``file_format``).
        """
        self._locale_dir = locale_dir or DEFAULT_LOCALE_DIR
        self._min_pairs = min_pairs
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=common.text_features(),
            supervised_keys=("inputs", "targets"),
            homepage="https://www.gnu.org/software/gettext/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        pairs, stats = load_pairs(self._locale_dir, self.builder_config)
        if stats["pairs"] < self._min_pairs:
            where = ", ".join(
                os.path.join(self._locale_dir, s, "LC_MESSAGES") for s in self.builder_config.locale_subdirs
            )
            raise DatasetUnavailableError(
                f"gettext_translation/{self.builder_config.name}: found {stats['catalogs']} .mo catalogs "
                f"with {stats['pairs']} usable pairs in {where} (need >= {self._min_pairs}); install the "
                f"language packs or {ALTERNATIVES}"
            )
        # By source text: a message translated differently by two packages never straddles splits.
        by_split = common.split_pairs(
            pairs, 0, f"gettext_translation/{self.builder_config.name}", ALTERNATIVES
        )
        return {split: self._generate_examples(examples) for split, examples in by_split.items()}

    def _generate_examples(self, pairs):
        for source, target in pairs:
            yield common.example_key(source, target), {"inputs": source, "targets": target}
