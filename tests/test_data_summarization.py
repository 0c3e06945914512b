"""The docstring summarization builder: ast-only extraction (never imports), cleaning, splits."""

import sys

import pytest

from moe_jax.data import DatasetUnavailableError
from moe_jax.data.builders import common
from moe_jax.data.builders import docstring_summarization as ds
from moe_jax.data.testing import write_fake_python_tree

BODY = ds.DocstringSummarizationConfig(name="t_body")
CODE = ds.DocstringSummarizationConfig(name="t_code", inputs_kind="code")

SOURCE = '''
"""Tools for testing the scanner. Second sentence of the first paragraph.

The module body has enough words to count as a training example: it explains what the module holds
and why anyone would read it at all.
"""


class Widget:
    """A widget that does very little.

    Example:

    >>> w = Widget()
    >>> w.spin()
    'spun'

    Widgets spin when asked, and they keep spinning until someone asks them politely to stop spinning.
    """

    def spin(self):
        """Spin the widget.

        Too short a body.
        """
        return "spun"
'''


def test_split_docstring_cuts_first_sentence_and_doctests():
    summary, body = ds.split_docstring(
        "Do the thing. Then more.\n\nBody text here.\n\n>>> f(1)\n2\n\nAfter the example."
    )
    assert summary == "Do the thing."
    assert body == "Then more. Body text here. After the example."


def test_pairs_from_source_body():
    pairs = ds.pairs_from_source(SOURCE, BODY)
    assert [summary for _, summary in pairs] == [
        "Tools for testing the scanner.",
        "A widget that does very little.",
    ]
    module_body, widget_body = pairs[0][0], pairs[1][0]
    assert module_body.startswith("Second sentence of the first paragraph. The module body")
    assert ">>>" not in widget_body and "'spun'" not in widget_body
    assert widget_body == (
        "Example: Widgets spin when asked, and they keep spinning until someone asks them politely to stop "
        "spinning."
    )


def test_pairs_from_source_code_strips_the_docstring_and_dedents():
    pairs = ds.pairs_from_source(SOURCE, CODE)
    assert pairs == [('def spin(self):\n    return "spun"', "Spin the widget.")]


def test_unparseable_source_gives_nothing():
    assert ds.pairs_from_source("def broken(:\n", BODY) == []


def test_builder_never_imports_scanned_code(tmp_path):
    pkg = write_fake_python_tree(tmp_path / "src", num_functions=80)
    (tmp_path / "src" / "fakepkg" / "tests").mkdir()
    (tmp_path / "src" / "fakepkg" / "tests" / "test_x.py").write_text(
        'def test_x():\n    """Test that x works.\n\n    ' + "word " * 30 + '\n    """\n'
    )
    builder = ds.DocstringSummarization(
        config="body_to_summary",
        roots=[str(tmp_path / "src")],
        min_pairs=50,
        data_dir=str(tmp_path / "data"),
        file_format="array_record",
    )
    builder.download_and_prepare()
    assert "explode" not in sys.modules and "fakepkg" not in sys.modules
    splits = {
        split: [(e["inputs"].decode(), e["targets"].decode()) for e in builder.as_data_source(split)]
        for split in common.SPLITS
    }
    summaries = [t for pairs in splits.values() for _, t in pairs]
    assert len(summaries) == 81  # 80 functions + the one in the module that raises on import.
    assert "Return nothing at all, since importing this file raises." in summaries
    assert not any(t.startswith("Test that") for t in summaries)  # tests/ is skipped.
    for split, pairs in splits.items():
        assert all(common.split_of(t) == split for _, t in pairs)
    assert pkg.endswith("fakepkg")


def test_code_config(tmp_path):
    write_fake_python_tree(tmp_path / "src", num_functions=80)
    pairs, stats = ds.load_pairs([str(tmp_path / "src")], CODE)
    assert stats["files"] == 2 and len(pairs) == 80  # defused() has no code after its docstring.
    assert all(code.startswith("def func_") and '"""' not in code for code, _ in pairs)


def test_caps_limit_files_and_pairs(tmp_path):
    write_fake_python_tree(tmp_path / "src", num_functions=80)
    # Files are walked in sorted order: explode.py (1 pair) comes before funcs.py (80).
    one_file = ds.DocstringSummarizationConfig(name="one_file", max_files=1)
    assert ds.load_pairs([str(tmp_path / "src")], one_file)[1] == {"files": 1, "pairs": 1}
    ten_pairs = ds.DocstringSummarizationConfig(name="ten_pairs", max_pairs=10)
    assert ds.load_pairs([str(tmp_path / "src")], ten_pairs)[1] == {"files": 2, "pairs": 10}


def test_no_sources_raise_one_clear_line(tmp_path):
    builder = ds.DocstringSummarization(
        roots=[str(tmp_path)], data_dir=str(tmp_path / "data"), file_format="array_record"
    )
    with pytest.raises(DatasetUnavailableError) as info:
        builder.download_and_prepare()
    assert "\n" not in str(info.value) and "found 0 pairs" in str(info.value)
    assert "configs/translation.py" in str(info.value)


def test_default_roots_are_stdlib_and_site_packages():
    roots = ds.default_roots()
    assert any(r.endswith("python" + ".".join(map(str, sys.version_info[:2]))) for r in roots)
