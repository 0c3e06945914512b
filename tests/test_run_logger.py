"""RunLogger reading an existing metrics.jsonl: torn last line, bad middle line, atomic rewrite, read-only."""

import io
import json
import os

import pytest

from moe_jax.errors import ConfigError
from moe_jax.train import logging as run_logging
from moe_jax.train.logging import RunLogger

_WARNING = "warning: metrics.jsonl: last line is incomplete (a crash mid-write?); ignoring it"


def _rows(*steps):
    return [{"step": s, "kind": "train", "loss": 1.0 / s} for s in steps]


def _text(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _logger(workdir, start_step, **kwargs):
    kwargs.setdefault("tensorboard", False)
    return RunLogger(str(workdir), total_steps=100, start_step=start_step, stream=io.StringIO(), **kwargs)


def _files(workdir):
    return sorted(p.name for p in workdir.iterdir())


def test_torn_last_line_is_ignored_with_one_warning_and_good_rows_kept(tmp_path, capsys):
    good = _text(_rows(1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(good + '{"step": 4, "kind": "train", "lo')
    logger = _logger(tmp_path, start_step=3)
    err = capsys.readouterr().err
    assert err.splitlines() == [_WARNING]
    assert logger.history == _rows(1, 2, 3)
    # The torn tail is gone (atomically), so the next append cannot turn it into a bad middle line.
    assert (tmp_path / "metrics.jsonl").read_text() == good
    logger.log_train(4, {"loss": 0.25})
    logger.close()
    assert _files(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind
    again = _logger(tmp_path, start_step=4)
    assert capsys.readouterr().err == ""
    assert [r["step"] for r in again.history] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "tail",
    [b'{"step": 4, "lo', b'{"step": 4, "loss": 0.2', b"\x00\x00\x00\x00", b'{"step": 4, "note": "\xc3'],
    ids=["mid-key", "mid-value", "nul-padding", "mid-utf8"],
)
def test_any_torn_tail_is_tolerated(tmp_path, capsys, tail):
    (tmp_path / "metrics.jsonl").write_bytes(_text(_rows(1, 2)).encode() + tail)
    logger = _logger(tmp_path, start_step=10)
    assert capsys.readouterr().err.splitlines() == [_WARNING]
    assert logger.history == _rows(1, 2)


@pytest.mark.parametrize("read_only", [False, True])
def test_bad_middle_line_raises_naming_file_and_line_and_leaves_file(tmp_path, capsys, read_only):
    content = (_text(_rows(1)) + '{"step": 2, "lo\n' + _text(_rows(3))).encode()
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _logger(tmp_path, start_step=1, read_only=read_only)  # a start step that would drop row 3
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "line 2" in message
    assert path.read_bytes() == content
    assert _files(tmp_path) == ["metrics.jsonl"]
    assert capsys.readouterr().err == ""  # not mistaken for a torn last line


def test_non_object_line_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_text(_rows(1)) + "[1, 2]\n" + _text(_rows(2)))
    with pytest.raises(ConfigError, match=r"line 2 is not a JSON object"):
        _logger(tmp_path, start_step=5)


def test_rows_past_start_step_are_dropped_through_an_atomic_replace(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    kept = '{"step": 1, "kind": "train", "loss": 1.0}\n{"step":2,"kind":"eval","bleu":3.5}\n'  # own spacing
    path.write_text(kept + _text(_rows(3, 4)))
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((os.path.dirname(os.path.abspath(src)), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(run_logging.os, "replace", spy)
    logger = _logger(tmp_path, start_step=2)
    assert [r["step"] for r in logger.history] == [1, 2]
    assert replaced == [(str(tmp_path), str(path))]  # written beside the file, then renamed over it
    assert path.read_text() == kept  # kept rows byte-for-byte
    assert _files(tmp_path) == ["metrics.jsonl"]


def test_a_failed_rewrite_loses_no_history(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    content = _text(_rows(1, 2, 3)).encode()
    path.write_bytes(content)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_logging.os, "replace", crash)
    with pytest.raises(ConfigError, match=r"cannot rewrite .*metrics.jsonl \(No space left on device\)"):
        _logger(tmp_path, start_step=1)
    assert path.read_bytes() == content
    assert _files(tmp_path) == ["metrics.jsonl"]  # the temporary file was removed


def test_no_rewrite_when_nothing_needs_dropping(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_text(_rows(1, 2, 3)))
    before = os.stat(path)

    def must_not_replace(src, dst):
        raise AssertionError(f"rewrote {dst} with nothing to drop")

    monkeypatch.setattr(run_logging.os, "replace", must_not_replace)
    logger = _logger(tmp_path, start_step=3)
    assert logger.history == _rows(1, 2, 3)
    after = os.stat(path)
    identity = lambda st: (st.st_ino, st.st_mtime_ns, st.st_size)
    assert identity(after) == identity(before)


def test_missing_final_newline_is_fixed_before_appending(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_text(_rows(1)) + json.dumps(_rows(2)[0]))  # complete row, crash before its newline
    logger = _logger(tmp_path, start_step=2)
    assert capsys.readouterr().err == ""
    logger.log_train(3, {"loss": 0.3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_read_only_logger_leaves_metrics_byte_identical(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    content = _text(_rows(1, 2, 3, 4)).encode() + b'{"step": 5, "lo'  # rows past start and a torn tail
    path.write_bytes(content)
    stream = io.StringIO()
    logger = RunLogger(str(tmp_path), 100, start_step=2, tensorboard=True, stream=stream, read_only=True)
    assert capsys.readouterr().err.splitlines() == [_WARNING]
    assert logger.history == _rows(1, 2)
    logger.log_train(2, {"loss": 0.5, "moe/l0/expert_load": [0.5, 0.5]})
    logger.log_eval(2, {"loss": 0.6})
    assert logger.plot_routing() is None
    logger.close()
    assert path.read_bytes() == content
    assert _files(tmp_path) == ["metrics.jsonl"]  # no tensorboard/, no routing.png, no temporary file
    assert [r["kind"] for r in logger.history] == ["train", "train", "train", "eval"]
    progress = stream.getvalue().splitlines()
    assert progress[0].startswith("step 2/100 | loss 0.5000") and progress[1].startswith("eval step 2 |")


def test_fresh_workdir_appends_rows(tmp_path):
    logger = _logger(tmp_path, start_step=0)
    logger.log_train(1, {"loss": 2.0})
    logger.log_eval(1, {"loss": 2.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train", "eval"]
