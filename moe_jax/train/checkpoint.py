"""Orbax checkpoints: model + optimizer state, the run's config, the Grain iterator state and metadata.

One ``CheckpointManager`` per workdir (``WORKDIR/checkpoints``), async saves, keeping the latest ``keep``
steps plus the best one by validation loss. Restoring walks the steps from the newest: a step that fails to
restore is reported and skipped (never deleted) and the previous one is tried, because Orbax still lists a
step directory whose files are damaged (only ``<step>.orbax-checkpoint-tmp`` directories of a crashed save
are ignored by it). A step that could not be read does not count toward ``keep``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from moe_jax.errors import CheckpointWriteError, ConfigError
from moe_jax.train.workdir import describe_os_error

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


def model_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "model"
) -> list[str]:
    """Fields whose values differ between two (nested) config dicts, as ``name: saved vs current``."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += model_differences(a, b, f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}.{k}: {a!r} in the checkpoint vs {b!r} now")
    return out


# Model fields that change how a step is computed, not what the model is: a run may resume with another value
# (all of them give the same results). Dotted names are fields of a sub-section.
RUNTIME_MODEL_FIELDS = (
    "remat_policy",
    "moe.dispatch",
    "moe.grouped_backend",
    "moe.expert_parallel",
    "moe.ep_transport",
)


def _without_runtime_fields(model: Mapping[str, Any]) -> dict:
    out = dict(model)
    for name in RUNTIME_MODEL_FIELDS:
        section, _, field = name.rpartition(".")
        if not section:
            out.pop(field, None)
        elif isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k != field}
    return out


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a checkpoint's recorded identity and this run's: task, data, tokenizer, model.

    Keys a checkpoint does not record (older runs) are not compared, nor are :data:`RUNTIME_MODEL_FIELDS`
    (on either side: checkpoints written before a field became runtime-only still record it).
    """
    out = []
    for key in ("task", "data", "vocab_size", "model", "optimizer"):
        if key not in saved or key not in current:
            continue
        a, b = saved[key], current[key]
        if key == "model" and isinstance(a, Mapping) and isinstance(b, Mapping):
            a, b = _without_runtime_fields(a), _without_runtime_fields(b)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += model_differences(a, b, key)
        elif a != b:
            out.append(f"{key}: {a!r} in the checkpoint vs {b!r} now")
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
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"config.train.keep_checkpoints={keep!r} must be an integer >= 1")
        # Orbax's background writer needs an absolute path (a relative one fails after training went on).
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        self.report = report or log.warning
        self.keep, self.async_save = keep, async_save
        self.unreadable: list[int] = []
        self.mngr = self._manager()
        self._pending: set[int] = set()
        self._failed = False

    def _manager(self) -> ocp.CheckpointManager:
        # Steps the run could not read are kept (never deleted) and do not take one of the `keep` slots.
        policies = [
            cm.LatestN(n=self.keep + len(self.unreadable)),
            # BestN keeps the largest values, so rank by negative validation loss.
            cm.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1, keep_checkpoints_without_metrics=False),
        ]
        if self.unreadable:
            policies.append(cm.CustomSteps(steps=list(self.unreadable)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(self.directory, options=options)

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
        self.check()
        try:
            # Orbax finishes the previous save before starting this one; its failure surfaces here too.
            started = self.mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - a write failed (disk, permissions)
            self._failed = True
            raise CheckpointWriteError(self._write_failure(e)) from None
        self._pending = {step}  # the only save that can still be in flight
        return bool(started)

    def check_identity(self, identity: Mapping) -> None:
        """Refuses early (before data and model are built) when the newest readable step is another run's.

        Raises:
            ConfigError: naming what differs (see :func:`identity_differences`).
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception:  # noqa: BLE001 - unreadable steps are reported by restore_latest
                continue
            self._refuse_if_different(step, meta, identity)
            return

    def _refuse_if_different(self, step: int, meta: Mapping, identity: Mapping) -> None:
        diffs = identity_differences(meta, identity)
        if diffs:
            what = "model" if all(d.startswith("model.") for d in diffs) else "run"
            raise ConfigError(
                f"workdir checkpoint {self.directory} (step {step}) holds a different {what} ("
                f"{'; '.join(diffs[:3])}); use a new --workdir, or run with the checkpoint's config"
            )

    def read_meta(self, step: int) -> dict:
        return dict(self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def read_config(self, step: int) -> dict:
        """The run config saved with ``step`` (as JSON values)."""
        return dict(self.mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def restore_latest(
        self,
        template: nnx.State,
        shardings: nnx.State | None,
        *,
        model_config: Mapping | None = None,
        identity: Mapping | None = None,
        data_iter=None,
    ) -> tuple[int, nnx.State, dict] | None:
        """Restores the newest readable step onto ``shardings``; None when there is no checkpoint.

        Args:
            template, shardings: the state to restore into and its target shardings (another mesh works).
            model_config: the model section to compare with the checkpoint's (same as ``identity={'model':
                ...}``).
            identity: what the checkpoint must match (``task``, ``data``, ``vocab_size``, ``model``).
            data_iter: a Grain iterator whose position is restored too.

        Raises:
            ConfigError: the checkpoint holds a different run (naming what differs), or no step can be read.
        """
        identity = dict(identity or {})
        if model_config is not None:
            identity["model"] = model_config
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - any unreadable file means "try the previous step"
                failures.append(step)
                self._report_unreadable(step, e)
                continue
            self._refuse_if_different(step, meta, identity)
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
                self.unreadable = sorted(failures)
                self.mngr.close()
                self.mngr = self._manager()  # they must not take the slots of the good steps
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

    def check(self) -> None:
        """Raises :class:`CheckpointWriteError` as soon as a background save has failed.

        Cheap (no waiting): the loop calls it every step, so a failed save ends the run at once instead of
        at the next save. Orbax keeps the failure on its finalize thread; ``check_for_errors`` does not
        report it in orbax 0.12, so the thread is read directly (guarded, in case the attribute moves).
        """
        holder = getattr(self.mngr, "_finalize_thread", None)
        thread = holder.get() if holder is not None and hasattr(holder, "get") else None
        if thread is None or thread.is_alive():
            return
        error = getattr(thread, "exception", None)
        if error is None:
            self._pending.clear()
        else:
            self._failed = True
            raise CheckpointWriteError(self._write_failure(error)) from None

    def _write_failure(self, error: BaseException) -> str:
        good = [s for s in self.steps() if s not in self._pending]
        kept = f"the last good checkpoint is step {good[-1]}" if good else "no earlier checkpoint exists"
        return (
            f"saving a checkpoint in {self.directory} failed ({describe_os_error(error)}); {kept}; "
            f"free space or fix the directory's permissions, then re-run to resume"
        )

    def wait(self) -> None:
        """Blocks until pending saves are written; a failed one raises :class:`CheckpointWriteError`."""
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the background write is reported the same way
            self._failed = True
            raise CheckpointWriteError(self._write_failure(e)) from None
        self._pending.clear()

    def close(self) -> None:
        """Waits for pending saves and releases the manager; after a reported failure, only releases."""
        if not self._failed:
            self.wait()
        try:
            self.mngr.close()
        except Exception:  # noqa: BLE001 - the failure was reported already; closing must not add another
            if not self._failed:
                raise
