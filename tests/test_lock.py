"""WorkdirLock: a second run on one workdir is refused in one line; a dead holder never leaves it stuck."""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from moe_jax.errors import ConfigError
from moe_jax.train import lock as lock_module
from moe_jax.train.lock import WorkdirLock

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MESSAGE = re.compile(
    r"^another run \(pid (\d+), started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\) is using --workdir=(.+); "
    r"wait for it to finish or pass another --workdir$"
)


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    path = _REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


_HOLD = """
    import sys, time
    from moe_jax.train.lock import WorkdirLock
    with WorkdirLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
"""

_TRY = """
    import sys
    from moe_jax.errors import ConfigError
    from moe_jax.train.lock import WorkdirLock
    try:
        with WorkdirLock(sys.argv[1]):
            print("locked", flush=True)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
"""


def test_second_lock_in_a_subprocess_is_refused_with_one_line(tmp_path):
    with WorkdirLock(tmp_path):
        proc = _python(_TRY, str(tmp_path))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "locked" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    match = _MESSAGE.match(lines[0])
    assert match, lines[0]
    assert int(match.group(1)) == os.getpid()
    assert match.group(2) == str(tmp_path)


def test_sigkilled_holder_leaves_no_stuck_lock(tmp_path):
    holder = _python(_HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(ConfigError) as info:
            WorkdirLock(tmp_path).acquire()
        message = str(info.value)
        assert "\n" not in message
        match = _MESSAGE.match(message)
        assert match, message
        assert int(match.group(1)) == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    # The kernel dropped the dead holder's lock; its stale record in the file does not matter.
    with WorkdirLock(tmp_path) as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_same_process_can_lock_again_after_release(tmp_path):
    lock = WorkdirLock(tmp_path)
    # Another lock on the same workdir is refused even in this process (flock belongs to the open file).
    with lock, pytest.raises(ConfigError, match=rf"pid {os.getpid()}, started"):
        WorkdirLock(tmp_path).acquire()
    assert not lock.held
    assert (tmp_path / ".lock").read_text() == ""  # the record is cleared, the file is kept
    with lock:  # the same object, re-entered
        assert lock.held
    with WorkdirLock(tmp_path):  # a new object
        pass


def test_lock_touches_no_other_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints").mkdir()
    with WorkdirLock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_lock_file_that_cannot_be_created_names_the_path(tmp_path):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError) as info:
        WorkdirLock(not_a_dir).acquire()
    message = str(info.value)
    assert "\n" not in message
    assert str(not_a_dir / ".lock") in message
    assert "not a directory" in message


def test_unwritable_workdir_names_the_lock_path(tmp_path, monkeypatch):
    # chmod cannot make a directory unwritable for root (CI runs as root): the OS error is injected.
    def refuse(path, *args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(lock_module.os, "open", refuse)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / ".lock")) + r".*permission denied"):
        WorkdirLock(tmp_path).acquire()


def test_read_only_file_system_names_the_lock_path(tmp_path, monkeypatch):
    # Runs as root too, where chmod cannot make a directory read-only: the OS error is injected.
    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(lock_module.os, "open", refuse)
    with pytest.raises(ConfigError) as info:
        WorkdirLock(tmp_path).acquire()
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / ".lock") in message and "read-only file system" in message
