"""Reading and writing GNU gettext ``.mo`` catalogs without the gettext tools.

Reading goes through :class:`gettext.GNUTranslations` (the standard library's parser). A few real catalogs
declare UTF-8 but hold Latin-1 bytes, which that parser rejects; :func:`read_mo` then falls back to a raw
parse so one bad file costs its own pairs only. :func:`write_mo` is a minimal ``msgfmt`` so tests (and
anyone without gettext installed) can produce catalogs.
"""

from __future__ import annotations

import gettext
import io
import os
import re
import struct

_MAGIC_LE = 0x950412DE
_CHARSET_RE = re.compile(rb"charset=([A-Za-z0-9_.:-]+)")


def read_mo(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Returns the (msgid, msgstr) pairs of a catalog, singular forms only.

    The header entry (empty msgid) is skipped. A message context (``ctx\\x04msgid``) is dropped from the
    msgid; for a plural entry the msgid singular and the first plural form of the translation are returned.

    Args:
      path: a ``.mo`` file.

    Returns:
      Pairs in catalog order. Unreadable files (bad magic, truncated) give an empty list.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        # _catalog is the parsed mapping; the public gettext() API cannot enumerate it.
        catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog
    except (UnicodeDecodeError, LookupError):
        return _raw_pairs(data)
    except (OSError, struct.error, ValueError, IndexError):
        return []
    pairs = []
    for key, value in catalog.items():
        if isinstance(key, tuple):
            msgid, index = key
            if index != 0:
                continue
        else:
            msgid = key
        msgid = msgid.rsplit("\x04", 1)[-1]
        if msgid:
            pairs.append((msgid, value))
    return pairs


def _raw_pairs(data: bytes) -> list[tuple[str, str]]:
    """Parses a catalog by hand, decoding each string as UTF-8 and falling back to Latin-1."""
    try:
        magic = struct.unpack("<I", data[:4])[0]
        endian = "<" if magic == _MAGIC_LE else ">"
        _, count, orig_off, trans_off = struct.unpack(endian + "4I", data[4:20])
        raw = []
        for i in range(count):
            olen, ooff = struct.unpack(endian + "2I", data[orig_off + 8 * i : orig_off + 8 * i + 8])
            tlen, toff = struct.unpack(endian + "2I", data[trans_off + 8 * i : trans_off + 8 * i + 8])
            raw.append((data[ooff : ooff + olen], data[toff : toff + tlen]))
    except struct.error:
        return []

    def decode(b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b.decode("latin-1")

    pairs = []
    for msgid, msgstr in raw:
        if not msgid:
            continue
        msgid = msgid.split(b"\x00", 1)[0].rsplit(b"\x04", 1)[-1]
        pairs.append((decode(msgid), decode(msgstr.split(b"\x00", 1)[0])))
    return pairs


def write_mo(path: str | os.PathLike, messages: dict, charset: str = "UTF-8") -> None:
    """Writes a little-endian ``.mo`` file, as ``msgfmt`` would.

    Args:
      path: output file.
      messages: msgid -> msgstr. A key ``(singular, plural)`` with a tuple value of forms writes a plural
        entry; a header (empty msgid) declaring ``charset`` is added unless given.
      charset: the charset the header declares and the strings are encoded with.
    """
    entries = {}
    for key, value in messages.items():
        if isinstance(key, tuple):
            entries["\x00".join(key)] = "\x00".join(value)
        else:
            entries[key] = value
    entries.setdefault(
        "", f"Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
    )
    # The format requires msgids sorted by their encoded bytes (gettext binary-searches them).
    items = sorted((k.encode(charset), v.encode(charset)) for k, v in entries.items())
    n = len(items)
    orig_table, trans_table = 28, 28 + 8 * n
    offset = 28 + 16 * n
    ids, strs, orig_desc, trans_desc = b"", b"", [], []
    for k, _ in items:
        orig_desc.append((len(k), offset + len(ids)))
        ids += k + b"\x00"
    offset += len(ids)
    for _, v in items:
        trans_desc.append((len(v), offset + len(strs)))
        strs += v + b"\x00"
    header = struct.pack("<7I", _MAGIC_LE, 0, n, orig_table, trans_table, 0, 0)
    tables = b"".join(struct.pack("<2I", *d) for d in orig_desc + trans_desc)
    with open(path, "wb") as f:
        f.write(header + tables + ids + strs)
