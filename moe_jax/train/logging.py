"""Run logging: a progress line, ``WORKDIR/metrics.jsonl``, TensorBoard event files and a routing plot.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``loss``, ``learning_rate``, aux losses,
``tokens_per_sec``, ``steps_per_sec`` and per-MoE-layer ``moe/<layer>/expert_load`` (a list over experts),
``dropped_fraction``, ``router_entropy`` ...; evaluation rows carry ``"kind": "eval"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Mapping

import numpy as np

from moe_jax.errors import ConfigError


def _jsonable(value):
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return arr.tolist()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _read_metrics(path: str) -> tuple[bytes, list[tuple[bytes, dict]]]:
    """The bytes of ``metrics.jsonl`` and its rows as (raw line ending in a newline, parsed row).

    A torn last line is left out with a warning; an unreadable file or a bad line before the last raises
    :class:`ConfigError`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    # Split on "\n" only: a JSON line cannot hold a raw newline, and line numbers then match an editor's.
    parts = data.split(b"\n")
    raw = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    last = max((i for i, line in enumerate(raw) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # json.JSONDecodeError, UnicodeDecodeError: a torn write looks like this
            if i == last:
                print(
                    "warning: metrics.jsonl: last line is incomplete (a crash mid-write?); ignoring it",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            row = None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{path}: line {i + 1} is not a JSON object ({_preview(line)}); only a torn last line is "
                "ignored. Fix or remove that line, or pass another --workdir"
            )
        rows.append((line if line.endswith(b"\n") else line + b"\n", row))
    return data, rows


def _preview(line: bytes) -> str:
    text = " ".join(line.decode("utf-8", "replace").split())
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _replace_atomically(path: str, content: bytes) -> None:
    """Replaces ``path`` with ``content`` through a temporary file in the same directory and ``os.replace``:
    after a crash the file is either the old one or the new one, never a truncated mix."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # our own temporary file; the original is untouched
        cause = e.strerror or type(e).__name__
        raise ConfigError(f"cannot rewrite {path} ({cause}); it is unchanged") from None
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class RunLogger:
    """Writes training and evaluation metrics.

    Args:
        workdir: where ``metrics.jsonl``, ``tensorboard/`` and ``routing.png`` go.
        total_steps: for the ETA.
        start_step: the step the run starts (or resumes) from; rows of ``metrics.jsonl`` past it belong to
            a run that was lost and are dropped, so each step appears once.
        tensorboard: write TensorBoard event files (tensorboardX).
        stream: where the progress line goes.
        read_only: for evaluation-only runs, which must never change training history: ``metrics.jsonl`` is
            read but never rewritten or appended to (rows logged stay in :attr:`history`), and no TensorBoard
            events or plot are written. Progress lines are still printed.

    Raises:
        ConfigError: ``metrics.jsonl`` cannot be read, or a line before its last is not a JSON object (the
            message names the file and the line; the file is left as it is). A torn last line -- a crash
            mid-write -- is not an error: it is ignored with a warning on stderr.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        start_step: int = 0,
        *,
        tensorboard: bool = True,
        stream=None,
        read_only: bool = False,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.workdir, self.total_steps, self.stream = workdir, total_steps, stream or sys.stdout
        self.read_only = read_only
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.history: list[dict] = []
        if os.path.exists(self.path):
            data, rows = _read_metrics(self.path)
            kept = [(line, row) for line, row in rows if row.get("step", 0) <= start_step]
            self.history = [row for _, row in kept]
            # Rewrite only when something must go (rows of a lost run; a torn tail or a missing final newline
            # that the next append would turn into a bad middle line), and atomically, so a crash here cannot
            # lose history.
            content = b"".join(line for line, _ in kept)
            if not read_only and content != data:
                _replace_atomically(self.path, content)
        self.writer = None
        if tensorboard and not read_only:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._last_time, self._last_step = time.time(), start_step
        self._start_time, self._start_step = self._last_time, start_step

    def _write(self, row: dict) -> None:
        self.history.append(row)
        if self.read_only:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_train(self, step: int, metrics: Mapping, *, tokens: float = 0.0) -> dict:
        """Logs host metrics of ``step``; ``tokens`` counts the tokens processed since the last call."""
        now = time.time()
        dt = max(now - self._last_time, 1e-9)
        steps_per_sec = (step - self._last_step) / dt
        self._last_time, self._last_step = now, step
        row = {"step": int(step), "kind": "train"}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        row["steps_per_sec"] = steps_per_sec
        row["tokens_per_sec"] = tokens / dt
        self._write(row)
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("step",):
                    self.writer.add_scalar(f"train/{k}", v, step)
                elif isinstance(v, list) and k.endswith("expert_load"):
                    for e, load in enumerate(v):
                        self.writer.add_scalar(f"train/{k}/{e}", load, step)
        overall = (step - self._start_step) / max(now - self._start_time, 1e-9)
        eta = (self.total_steps - step) / max(overall, 1e-9)
        print(
            f"step {step}/{self.total_steps} | loss {row.get('loss', float('nan')):.4f} | "
            f"{steps_per_sec:.2f} steps/s | {row['tokens_per_sec']:.0f} tok/s | ETA {format_duration(eta)}",
            file=self.stream,
            flush=True,
        )
        return row

    def log_eval(self, step: int, metrics: Mapping, prefix: str = "eval") -> dict:
        row = {"step": int(step), "kind": prefix}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._write(row)
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        # Per-layer routing averages go to metrics.jsonl and TensorBoard; the line shows the headline numbers.
        shown = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and "moe/" not in k)
        print(f"{prefix} step {step} | {shown}", file=self.stream, flush=True)
        return row

    def plot_routing(self, filename: str = "routing.png") -> str | None:
        """Expert load per MoE layer over training (one panel per layer); returns the path or None."""
        if self.read_only:
            return None
        rows = [r for r in self.history if r.get("kind") == "train"]
        layers = sorted({k[: -len("/expert_load")] for r in rows for k in r if k.endswith("/expert_load")})
        if not layers:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 2.2 * len(layers)), sharex=True, squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            pts = [(r["step"], r[f"{layer}/expert_load"]) for r in rows if f"{layer}/expert_load" in r]
            steps = [p[0] for p in pts]
            load_SE = np.asarray([p[1] for p in pts])
            for e in range(load_SE.shape[1]):
                ax.plot(steps, load_SE[:, e], lw=1, label=f"expert {e}")
            ax.axhline(1.0 / load_SE.shape[1], color="k", ls="--", lw=0.8)
            ax.set_ylabel("load")
            ax.set_title(layer.removeprefix("moe/"), fontsize=9)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].legend(fontsize=6, ncol=4, loc="upper right")
        fig.tight_layout()
        path = os.path.join(self.workdir, filename)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
