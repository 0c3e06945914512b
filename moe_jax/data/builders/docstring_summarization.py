"""TFDS builder: summarization pairs from Python docstrings (body -> summary line, or code -> summary line).

A docstring's first sentence is a human-written summary of the paragraphs that follow it. This builder
parses ``.py`` files under configurable roots with :mod:`ast` -- the scanned code is never imported or run
-- and pairs each module, class and function docstring's body with its summary line. The ``code_to_summary``
config pairs a function's source (its docstring removed) with the summary instead.

Default roots are the standard library and the running interpreter's site-packages, walked in sorted order
and capped by file and pair counts so preparation stays well under a minute on two cores.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import sysconfig
import textwrap

import tensorflow_datasets as tfds

from moe_jax.data.builders import common
from moe_jax.data.errors import DatasetUnavailableError

DEFAULT_MIN_PAIRS = 500
ALTERNATIVES = (
    "use --config=configs/translation.py (offline gettext catalogs) or a prepared TFDS dataset such as "
    "--config=configs/summarization.py:cnn_dailymail"
)
# Test suites hold docstrings like "Test that X" and files that are deliberately invalid; vendored copies
# and caches repeat what is already scanned.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "testing",
        "__pycache__",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "_vendor",
        "vendor",
        "node_modules",
        ".git",
    }
)
_MAX_FILE_BYTES = 400_000
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`\"'])")
_DOCTEST_RE = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")


@dataclasses.dataclass(eq=False)
class DocstringSummarizationConfig(tfds.core.BuilderConfig):
    """What to pair and how much to scan.

    Attributes:
      inputs_kind: ``'body'`` (docstring body) or ``'code'`` (function source without its docstring).
      min_body_words: minimum words in a docstring body (body configs).
      max_input_words: longer bodies are truncated to this many words (code: lines are capped instead).
      max_code_lines: functions longer than this are skipped (code config).
      max_summary_words: longer summaries are not summaries; the pair is skipped.
      max_files: files scanned at most, over all roots in order.
      max_pairs: pairs kept at most (the scan stops there).
    """

    inputs_kind: str = "body"
    min_body_words: int = 15
    max_input_words: int = 300
    max_code_lines: int = 60
    max_summary_words: int = 40
    max_files: int = 1500
    max_pairs: int = 40_000


def default_roots() -> tuple[str, ...]:
    """The standard library and this interpreter's site-packages (duplicates removed)."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib"):
        path = os.path.realpath(paths[key])
        if path not in roots and os.path.isdir(path):
            roots.append(path)
    return tuple(roots)


def python_files(roots, max_files: int) -> list[str]:
    """Lists ``.py`` files under ``roots`` in a deterministic order, at most ``max_files``."""
    files: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    files.append(os.path.join(dirpath, name))
                    if len(files) >= max_files:
                        return files
    return files


def split_docstring(doc: str) -> tuple[str, str]:
    """Splits a cleaned docstring into (summary sentence, body).

    The summary is the first paragraph cut at its first sentence end; whatever the first paragraph holds
    after that sentence joins the body. Doctest lines (``>>>``, ``...``) and their output are dropped from
    the body because they are code, not prose.

    Args:
      doc: a docstring as returned by ``inspect.cleandoc`` / ``ast.get_docstring``.

    Returns:
      (summary, body) with whitespace collapsed; either may be empty.
    """
    paragraphs = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    first = " ".join(paragraphs[0].split())
    sentences = _SENTENCE_END_RE.split(first, maxsplit=1)
    summary = sentences[0]
    rest = [sentences[1]] if len(sentences) > 1 else []
    if len(paragraphs) > 1:
        kept, in_doctest = [], False
        for line in paragraphs[1].splitlines():
            if _DOCTEST_RE.match(line):
                in_doctest = True
                continue
            if not line.strip():
                in_doctest = False
            if not in_doctest:
                kept.append(line)
        rest.append("\n".join(kept))
    body = " ".join(" ".join(rest).split())
    return summary, body


def _code_without_docstring(source_lines: list[str], node: ast.AST) -> str | None:
    """The function's source with its docstring statement removed, or None if unavailable."""
    segment_lines = source_lines[node.lineno - 1 : node.end_lineno]
    doc_node = node.body[0]
    start = doc_node.lineno - node.lineno
    end = doc_node.end_lineno - node.lineno + 1
    lines = segment_lines[:start] + segment_lines[end:]
    if not lines:
        return None
    # A method's lines carry the class indentation; dedent so code inputs look alike wherever defined.
    return textwrap.dedent("\n".join(lines)).strip()


def pairs_from_source(source: str, config: DocstringSummarizationConfig) -> list[tuple[str, str]]:
    """Extracts (inputs, summary) pairs from one file's text without executing it.

    Args:
      source: Python source text.
      config: what to pair and the length limits.

    Returns:
      Pairs in file order; ``[]`` for a file that does not parse.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    if config.inputs_kind == "body":
        kinds += (ast.ClassDef, ast.Module)
    source_lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, kinds):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        summary, body = split_docstring(doc)
        n_summary = len(summary.split())
        if not 2 <= n_summary <= config.max_summary_words:
            continue
        # A summary opening with a bullet or a symbol ("+ The name is ...") is a list item, not a summary.
        if not (summary[0].isalpha() or summary[0] in "`'\""):
            continue
        if config.inputs_kind == "body":
            words = body.split()
            if len(words) < config.min_body_words:
                continue
            inputs = " ".join(words[: config.max_input_words])
        else:
            if node.end_lineno - node.lineno + 1 > config.max_code_lines:
                continue
            inputs = _code_without_docstring(source_lines, node)
            if not inputs or len(inputs.splitlines()) < 2:
                continue
        pairs.append((inputs, summary))
    return pairs


def load_pairs(roots, config: DocstringSummarizationConfig) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Scans ``roots`` and returns deduplicated pairs sorted by text, plus counts (files, pairs)."""
    files = python_files(roots, config.max_files)
    seen_inputs: set[str] = set()
    pairs = []
    for path in files:
        try:
            if os.path.getsize(path) > _MAX_FILE_BYTES:
                continue
            with open(path, "rb") as f:
                source = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for inputs, summary in pairs_from_source(source, config):
            # Identical bodies (copied docstrings, overloads) would straddle splits with different summaries.
            if inputs not in seen_inputs:
                seen_inputs.add(inputs)
                pairs.append((inputs, summary))
        if len(pairs) >= config.max_pairs:
            break
    pairs = sorted(pairs[: config.max_pairs])
    return pairs, {"files": len(files), "pairs": len(pairs)}


class DocstringSummarization(tfds.core.GeneratorBasedBuilder):
    """Docstring body (or function code) -> docstring summary line."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        DocstringSummarizationConfig(name="body_to_summary", description="Docstring body -> summary line."),
        DocstringSummarizationConfig(
            name="code_to_summary", description="Function source -> summary line.", inputs_kind="code"
        ),
    ]
    DEFAULT_CONFIG_NAME = "body_to_summary"

    def __init__(self, *, roots=None, min_pairs: int = DEFAULT_MIN_PAIRS, **kwargs):
        """Creates the builder.

        Args:
          roots: directories to scan (default :func:`default_roots`). Not part of the dataset identity:
            prepare different roots into different data dirs.
          min_pairs: fewer pairs than this raises :class:`DatasetUnavailableError`.
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``, ``file_format``).
        """
        self._roots = tuple(roots) if roots else default_roots()
        self._min_pairs = min_pairs
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=common.text_features(),
            supervised_keys=("inputs", "targets"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        pairs, stats = load_pairs(self._roots, self.builder_config)
        if stats["pairs"] < self._min_pairs:
            raise DatasetUnavailableError(
                f"docstring_summarization/{self.builder_config.name}: found {stats['pairs']} pairs in "
                f"{stats['files']} .py files under {', '.join(self._roots)} (need >= {self._min_pairs}); "
                f"{ALTERNATIVES}"
            )
        # By summary: common summaries ("Return a copy.") all land in one split, so test summaries are never
        # memorized from train.
        name = f"docstring_summarization/{self.builder_config.name}"
        by_split = common.split_pairs(pairs, 1, name, ALTERNATIVES)
        return {split: self._generate_examples(examples) for split, examples in by_split.items()}

    def _generate_examples(self, pairs):
        for inputs, summary in pairs:
            yield common.example_key(inputs, summary), {"inputs": inputs, "targets": summary}
