"""The gettext translation builder: .mo reading/writing, cleaning, dedupe, deterministic disjoint splits."""

import gettext
import os

import pytest

from moe_jax.data import DatasetUnavailableError
from moe_jax.data.builders import common, mo_file
from moe_jax.data.builders import gettext_translation as gt
from moe_jax.data.testing import fake_pairs, write_fake_catalogs

NOISY = {
    "%s: %s": "%s: %s",  # Only directives: dropped.
    "_Open": "Ö_ffnen",  # Accelerators.
    "Sa&ve As": "Speichern &unter",
    "Adding group `%s' (GID %d) ...\n": "Lege Gruppe »%s« (GID %d) an …\n",
    "Copy %(count)d files to {dest}": "Kopiere %(count)d Dateien nach {dest}",
    "OK": "OK",  # Identical: dropped by default.
    " ".join(["word"] * 70): " ".join(["Wort"] * 70),  # Too long.
    ("One file", "%d files"): ("Eine Datei", "%d Dateien"),  # Plural: singular forms kept.
}


def _write_noisy(locale_dir):
    out = os.path.join(locale_dir, "de", "LC_MESSAGES")
    os.makedirs(out, exist_ok=True)
    messages = dict(NOISY)
    messages["menu\x04Close window"] = "Fenster schließen"  # msgctxt entry.
    mo_file.write_mo(os.path.join(out, "noisy.mo"), messages)
    # The same pair in a second catalog must be deduplicated.
    mo_file.write_mo(os.path.join(out, "dup.mo"), {"_Open": "Ö_ffnen"})


def test_write_mo_is_read_by_gnu_gettext(tmp_path):
    path = tmp_path / "x.mo"
    mo_file.write_mo(path, {"Hello": "Hallo", "Grüße": "Grüße!", ("One file", "%d files"): ("Eine", "Viele")})
    with open(path, "rb") as f:
        translations = gettext.GNUTranslations(f)
    assert translations.gettext("Hello") == "Hallo"
    assert translations.gettext("Grüße") == "Grüße!"
    assert translations.ngettext("One file", "%d files", 1) == "Eine"
    assert translations.ngettext("One file", "%d files", 5) == "Viele"
    assert sorted(mo_file.read_mo(path)) == [("Grüße", "Grüße!"), ("Hello", "Hallo"), ("One file", "Eine")]


def test_read_mo_falls_back_when_the_declared_charset_lies(tmp_path):
    # Real catalogs (net-tools) declare UTF-8 but hold Latin-1 bytes; GNUTranslations raises on them.
    path = tmp_path / "latin.mo"
    mo_file.write_mo(path, {"": "Content-Type: text/plain; charset=UTF-8\n", "Close": "Schließen"}, "latin-1")
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        gettext.GNUTranslations(f)
    assert mo_file.read_mo(path) == [("Close", "Schließen")]


def test_read_mo_skips_garbage(tmp_path):
    path = tmp_path / "bad.mo"
    path.write_bytes(b"not a catalog at all")
    assert mo_file.read_mo(path) == []


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("Adding group `%s' (GID %d) ...\n", "Adding group (GID) ..."),
        ("_Open", "Open"),
        ("Ö_ffnen", "Öffnen"),
        ("Sa&ve", "Save"),
        ("Tom & Jerry", "Tom & Jerry"),
        ("NO_PROXY and HTTP_PROXY", "NO_PROXY and HTTP_PROXY"),
        ("100% of %(name)s done", "100% of done"),
        ("%1$s of %2$d", "of"),
        ("%<PRId64> bytes", "bytes"),
        ("{0} files in {dir}", "files in"),
        ("<b>Bold</b> text &amp; more", "Bold text & more"),
        ("Convert to a .po file", "Convert to a .po file"),
        ("  many\n\tspaces  ", "many spaces"),
        ("%s: %s", ":"),
    ],
)
def test_clean_message(raw, clean):
    assert gt.clean_message(raw) == clean


def test_load_pairs_cleans_dedupes_and_filters(tmp_path):
    _write_noisy(tmp_path)
    config = gt.GettextTranslation.builder_configs["en_de"]
    pairs, stats = gt.load_pairs(str(tmp_path), config)
    assert stats["catalogs"] == 2
    assert pairs == sorted(
        [
            ("Adding group (GID) ...", "Lege Gruppe (GID) an …"),
            ("Close window", "Fenster schließen"),
            ("Copy files to", "Kopiere Dateien nach"),
            ("One file", "Eine Datei"),
            ("Open", "Öffnen"),
            ("Save As", "Speichern unter"),
        ]
    )


def _prepare(locale_dir, data_dir, min_pairs=100):
    builder = gt.GettextTranslation(
        config="en_de",
        locale_dir=str(locale_dir),
        min_pairs=min_pairs,
        data_dir=str(data_dir),
        file_format="array_record",
    )
    builder.download_and_prepare()
    return {
        split: sorted((e["inputs"].decode(), e["targets"].decode()) for e in builder.as_data_source(split))
        for split in common.SPLITS
    }


def test_builder_splits_are_deterministic_and_disjoint(tmp_path):
    write_fake_catalogs(tmp_path / "loc_a", num_pairs=400)
    splits = _prepare(tmp_path / "loc_a", tmp_path / "data_a")
    all_pairs = [p for s in common.SPLITS for p in splits[s]]
    assert sorted(all_pairs) == sorted(fake_pairs(400))
    assert len(splits["train"]) > 300 and splits["validation"] and splits["test"]
    sources = {s: {src for src, _ in splits[s]} for s in common.SPLITS}
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]
    for split, pairs in splits.items():
        assert all(common.split_of(src) == split for src, _ in pairs)

    # The same messages in one catalog, in another order, give identical splits.
    out = tmp_path / "loc_b" / "de" / "LC_MESSAGES"
    out.mkdir(parents=True)
    mo_file.write_mo(out / "z.mo", dict(reversed(fake_pairs(400))))
    assert _prepare(tmp_path / "loc_b", tmp_path / "data_b") == splits


def test_missing_catalogs_raise_one_clear_line(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        _prepare(tmp_path / "empty_locale", tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message
    assert "found 0 .mo catalogs" in message and str(tmp_path / "empty_locale") in message
    assert "configs/summarization.py" in message and "wmt14_de_en" in message


def test_too_few_pairs_raise(tmp_path):
    write_fake_catalogs(tmp_path / "loc", num_pairs=20)
    with pytest.raises(DatasetUnavailableError, match="20 usable pairs"):
        _prepare(tmp_path / "loc", tmp_path / "data", min_pairs=1000)


@pytest.mark.skipif(
    not gt.catalog_files(gt.DEFAULT_LOCALE_DIR, ("de",)), reason="no German gettext catalogs on this machine"
)
def test_machine_catalogs_give_thousands_of_pairs():
    pairs, stats = gt.load_pairs(gt.DEFAULT_LOCALE_DIR, gt.GettextTranslation.builder_configs["en_de"])
    print(f"en->de: {stats}")
    assert stats["pairs"] > 1000
    assert len(set(pairs)) == len(pairs)
