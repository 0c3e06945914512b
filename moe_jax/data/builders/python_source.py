"""TFDS builder: Python source files as language-model documents (default: the standard library's).

Every machine that runs this project has Python, so its standard library is a real, offline text corpus:
on CPython 3.11 the ``with_tests`` config (the default) holds 1,739 documents / 31.5 MB (1,790 ``.py``
files less 4 that are not UTF-8, 28 empty ones and 19 exact copies), ``no_tests`` 794 documents / 12.6 MB.
Preparing either takes about a second. Files are read as text, never imported or run. Each file is one
document; the split (90/5/5) is a hash of the file's path relative to its root, so a document lives in
exactly one split and the split is the same on every machine whatever order its file system lists
directories in. Identical files are kept once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sysconfig

import tensorflow_datasets as tfds

from moe_jax.data.builders import common
from moe_jax.data.errors import DatasetUnavailableError

DEFAULT_MIN_DOCUMENTS = 100
ALTERNATIVES = (
    "pass data.builder_kwargs={'roots': [...]} with directories of .py files, or use a prepared TFDS corpus "
    "such as --config=configs/lm.py:lm1b"
)
# Installed packages and caches are not the standard library (and differ between machines).
_ALWAYS_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules"})
_TEST_DIRS = frozenset({"test", "tests"})


@dataclasses.dataclass(eq=False)
class PythonSourceConfig(tfds.core.BuilderConfig):
    """Which files become documents.

    Attributes:
      include_tests: keep ``test``/``tests`` directories (in the standard library they hold 60% of the text).
      max_file_bytes: larger files are skipped (generated tables, not code people write).
    """

    include_tests: bool = True
    max_file_bytes: int = 1_000_000


def default_roots() -> tuple[str, ...]:
    """The running interpreter's standard library directory (none if this Python has no such directory)."""
    path = os.path.realpath(sysconfig.get_paths()["stdlib"])
    return (path,) if os.path.isdir(path) else ()


def python_files(root: str, include_tests: bool) -> list[str]:
    """``.py`` files under ``root`` in sorted walk order, without installed packages or caches."""
    skipped = _ALWAYS_SKIPPED_DIRS if include_tests else _ALWAYS_SKIPPED_DIRS | _TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped and not d.startswith("."))
        files.extend(os.path.join(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))
    return files


def load_documents(roots, config: PythonSourceConfig) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Reads the documents under ``roots``.

    Args:
      roots: directories to walk, in order.
      config: which files to keep.

    Returns:
      ``(relative path, text)`` pairs in walk order, plus counts: ``files`` seen, ``documents`` kept and
      ``skipped`` (too large, not UTF-8, empty or a duplicate of an earlier file).
    """
    documents, seen_texts, files = [], set(), 0
    for root in roots:
        for path in python_files(root, config.include_tests):
            files += 1
            try:
                if os.path.getsize(path) > config.max_file_bytes:
                    continue
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            # An empty __init__.py would be a document of one EOS; a copied file would sit in two splits.
            if not text.strip() or digest in seen_texts:
                continue
            seen_texts.add(digest)
            documents.append((pathlib.Path(os.path.relpath(path, root)).as_posix(), text))
    stats = {"files": files, "documents": len(documents), "skipped": files - len(documents)}
    return documents, stats


class PythonSource(tfds.core.GeneratorBasedBuilder):
    """Python source files, one document each: features ``text`` and ``path`` (relative to its root)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PythonSourceConfig(name="with_tests", description="Every .py file, test suites included."),
        PythonSourceConfig(
            name="no_tests", description="Without test/ and tests/ directories.", include_tests=False
        ),
    ]
    DEFAULT_CONFIG_NAME = "with_tests"

    def __init__(self, *, roots=None, min_documents: int = DEFAULT_MIN_DOCUMENTS, **kwargs):
        """Creates the builder.

        Args:
          roots: directories to read (default :func:`default_roots`, the standard library). Not part of the
            dataset identity: prepare different roots into different data dirs.
          min_documents: fewer documents than this raises :class:`DatasetUnavailableError`.
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``, ``file_format``).
        """
        self._roots = tuple(os.fspath(r) for r in roots) if roots else default_roots()
        self._min_documents = min_documents
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        name = f"python_source/{self.builder_config.name}"
        roots = ", ".join(self._roots) or "(no standard library directory found)"
        missing = [r for r in self._roots if not os.path.isdir(r)]
        if not self._roots or missing:
            raise DatasetUnavailableError(
                f"{name}: no directory {', '.join(missing) or roots} to read .py files from; {ALTERNATIVES}"
            )
        documents, stats = load_documents(self._roots, self.builder_config)
        if stats["documents"] < self._min_documents:
            raise DatasetUnavailableError(
                f"{name}: found {stats['documents']} usable .py files ({stats['files']} seen) under {roots} "
                f"(need >= {self._min_documents}); {ALTERNATIVES}"
            )
        by_split = {split: [] for split in common.SPLITS}
        for path, text in documents:
            by_split[common.split_of(path)].append((path, text))
        empty = [split for split, docs in by_split.items() if not docs]
        if empty:
            raise DatasetUnavailableError(
                f"{name}: {stats['documents']} files under {roots} are too few to fill the "
                f"{'/'.join(empty)} split(s); {ALTERNATIVES}"
            )
        return {split: self._generate_examples(docs) for split, docs in by_split.items()}

    def _generate_examples(self, documents):
        for path, text in documents:
            yield common.example_key(path, text), {"text": text, "path": path}
