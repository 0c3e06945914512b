"""The run's working directory: resolved once, checked before anything is written to it.

Orbax refuses relative checkpoint paths (in a background thread, after training has gone on), so every
entry point turns the user's ``--workdir`` into an absolute, user-expanded path here first. Any path a user
can type works: relative, ``~``, with spaces or non-ASCII characters.
"""

from __future__ import annotations

import errno
import os

from moe_jax.errors import ConfigError


def resolve_workdir(path: str | os.PathLike, *, create: bool = True) -> str:
    """Returns ``path`` as an absolute directory path, creating it when ``create``.

    Args:
        path: what the user typed (relative to the current directory, ``~`` expanded).
        create: make the directory (and its parents) if missing.

    Raises:
        ConfigError: the path is empty, is an existing file, cannot be created, or is not writable.
    """
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise ConfigError("--workdir is empty; pass --workdir=DIR (a directory for checkpoints and logs)")
    resolved = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        raise ConfigError(f"--workdir={text} is an existing file ({resolved}), not a directory; pass another")
    if create:
        try:
            os.makedirs(resolved, exist_ok=True)
        except OSError as e:
            cause = describe_os_error(e)
            raise ConfigError(f"--workdir={text}: cannot create {resolved} ({cause})") from None
    if os.path.isdir(resolved) and not os.access(resolved, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={text}: {resolved} is not writable; pass a directory you can write")
    return resolved


def describe_os_error(e: BaseException) -> str:
    """A short human cause for an OS-level failure found anywhere in ``e``'s chain ("disk full", ...)."""
    original, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e)
        if code == errno.ENOSPC or "No space left" in text:
            return "disk full (No space left on device)"
        if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
            return "permission denied"
        if code == errno.EROFS or "Read-only file system" in text:
            return "read-only file system"
        if code == errno.ENOTDIR:
            return "a part of the path is a file, not a directory"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    return f"{type(original).__name__}: {' '.join(str(original).split())[:200]}"
