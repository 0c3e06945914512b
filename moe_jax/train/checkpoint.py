"""Orbax checkpoints: model + optimizer state, the run's config, the Grain iterator state and metadata.

One ``CheckpointManager`` per workdir (``WORKDIR/checkpoints``), async saves, keeping the latest ``keep``
steps plus the best one by validation loss. Restoring walks the steps from the newest: a step that fails to
restore is reported and skipped (never deleted) and the previous one is tried, because Orbax still lists a
step directory whose files are damaged (COOKBOOK §4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from moe_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _flat(state: nnx.State) -> dict[str, Any]:
    """``{'a/b/0/c': value}``: string keys keep Orbax's tree format independent of NNX's key types."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    out = {}
    for path, v in leaves:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out


def _unflat(template: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
    keys = list(_flat(template))
    leaves, treedef = jax.tree_util.tree_flatten(template, is_leaf=lambda v: isinstance(v, nnx.Variable))
    new = [v.replace(flat[k]) if isinstance(v, nnx.Variable) else flat[k] for k, v in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _abstract(state: nnx.State, shardings: nnx.State | None) -> dict[str, jax.ShapeDtypeStruct]:
    flat = _flat(state)
    flat_sh = _flat(shardings) if shardings is not None else {}
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh.get(k)) for k, v in flat.items()}


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields whose values differ between two model config dicts, as ``name: saved vs current``."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if a != b:
            out.append(f"model.{k}: {a!r} in the checkpoint vs {b!r} now")
    return out


class Checkpointer:
    """Saves and restores training checkpoints in ``directory``.

    Args:
        directory: the checkpoint root (created if missing).
        keep: how many of the latest steps to keep (the best-by-validation step is kept as well).
        async_save: write in a background thread (``wait()`` blocks until done).
        report: called with a message for each skipped (unreadable) step; default ``logging.warning``.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, report=None):
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(n=keep),
                # BestN keeps the largest values, so rank by negative validation loss.
                cm.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = str(directory)
        self.report = report or log.warning
        self.mngr = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(
        self,
        step: int,
        state: nnx.State,
        *,
        config: Mapping,
        meta: Mapping,
        data_iter=None,
        val_loss: float | None = None,
    ) -> bool:
        """Starts an (async) save; returns False when the step exists already (it is left untouched)."""
        if step in self.mngr.all_steps():
            self.report(
                f"checkpoint step {step} exists already (an unreadable one is kept as is); not saving"
            )
            return False
        items = {
            "state": ocp.args.StandardSave(_flat(state)),
            "config": ocp.args.JsonSave(dict(config)),
            "meta": ocp.args.JsonSave(dict(meta)),
        }
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        return bool(self.mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True))

    def read_meta(self, step: int) -> dict:
        return dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore_latest(
        self, template: nnx.State, shardings: nnx.State | None, *, model_config: Mapping, data_iter=None
    ) -> tuple[int, nnx.State, dict] | None:
        """Restores the newest readable step onto ``shardings``; None when there is no checkpoint.

        Raises:
            ConfigError: the checkpoint holds a different model, or no step can be read.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any unreadable file means "try the previous step"
                failures.append(step)
                self._report_unreadable(step, e)
                continue
            diffs = model_differences(meta.get("model", {}), model_config)
            if diffs:
                raise ConfigError(
                    f"workdir checkpoint {self.directory} (step {step}) holds a different model ("
                    f"{'; '.join(diffs[:3])}); use a new --workdir, or run with the checkpoint's model config"
                )
            items = {"state": ocp.args.StandardRestore(_abstract(template, shardings))}
            if data_iter is not None:
                import grain

                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001
                failures.append(step)
                self._report_unreadable(step, e)
                continue
            if failures:
                self.report(
                    f"resuming from step {step}; unreadable newer steps {failures} were left in place"
                )
            return step, _unflat(template, restored["state"]), meta
        if steps:
            raise ConfigError(
                f"no readable checkpoint in {self.directory} (steps {steps} all failed to restore); "
                f"move that directory away or pass a new --workdir"
            )
        return None

    def _report_unreadable(self, step: int, e: Exception) -> None:
        reason = " ".join(str(e).split())[:200]
        self.report(
            f"checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: {reason}); "
            f"skipping it (not deleted)"
        )

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.close()
