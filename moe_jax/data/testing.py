"""Small deterministic corpora for tests and smoke runs: fake gettext catalogs and a fake Python tree.

They let a test prepare the offline builders in a temp dir in about a second, independent of what the
machine has installed::

    write_fake_catalogs(tmp / "locale", num_pairs=400)
    config.data.builder_kwargs = {"locale_dir": str(tmp / "locale"), "min_pairs": 100}
"""

from __future__ import annotations

import os
import random
import textwrap

from moe_jax.data.builders.mo_file import write_mo

_WORD_TEXT = (
    "file open save close the new old a window user password folder cannot find error read write "
    "network device disk copy move delete name list show hide select all settings print is not"
)
_WORDS = tuple(_WORD_TEXT.split())


def fake_translate(sentence: str) -> str:
    """The fake target language: a fixed word-by-word substitution (learnable by a tiny model)."""
    return " ".join(word[::-1] + "en" for word in sentence.split())


def fake_pairs(num_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct (English, fake-target) sentence pairs of 2-8 words."""
    rng = random.Random(seed)
    seen, pairs = set(), []
    while len(pairs) < num_pairs:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))).capitalize()
        if sentence not in seen:
            seen.add(sentence)
            pairs.append((sentence, fake_translate(sentence)))
    return pairs


def write_fake_catalogs(locale_dir: str | os.PathLike, num_pairs: int = 400, lang: str = "de") -> list[str]:
    """Writes ``num_pairs`` clean pairs over two ``.mo`` catalogs under ``<locale_dir>/<lang>/LC_MESSAGES``.

    Returns:
      The catalog paths.
    """
    out = os.path.join(locale_dir, lang, "LC_MESSAGES")
    os.makedirs(out, exist_ok=True)
    pairs = fake_pairs(num_pairs)
    half = len(pairs) // 2
    paths = []
    for name, chunk in (("fake-a.mo", pairs[:half]), ("fake-b.mo", pairs[half:])):
        path = os.path.join(out, name)
        write_mo(path, dict(chunk))
        paths.append(path)
    return paths


def write_fake_python_tree(root: str | os.PathLike, num_functions: int = 60) -> str:
    """Writes a package of documented functions (and one file that raises if imported).

    Returns:
      The package directory.
    """
    pkg = os.path.join(root, "fakepkg")
    os.makedirs(pkg, exist_ok=True)
    rng = random.Random(1)
    functions = []
    for i in range(num_functions):
        summary = f"Compute the {rng.choice(_WORDS)} {rng.choice(_WORDS)} number {i}."
        body = " ".join(rng.choice(_WORDS) for _ in range(20))
        functions.append(f'def func_{i}(x):\n    """{summary}\n\n    {body}.\n    """\n    return x + {i}\n')
    with open(os.path.join(pkg, "funcs.py"), "w") as f:
        f.write("\n\n".join(functions))
    with open(os.path.join(pkg, "explode.py"), "w") as f:
        f.write(
            textwrap.dedent('''\
            raise RuntimeError("this module must never be imported")


            def defused():
                """Return nothing at all, since importing this file raises.

                The scanner reads this docstring through the syntax tree, so the raise above never runs
                and this body still becomes a training example for the summarizer.
                """
            ''')
        )
    return pkg
