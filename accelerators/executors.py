"""Executors: the training run cut into cstorch ``DataExecutor`` segments around Lightning's validations.

A CS-X executor must run to its last step: closing it early ends the appliance session
(``DataExecutor.__iter__`` exits with ``GeneratorExit`` -> ``LtcBackendImpl.on_run_end`` ->
``shutdown_appliance``) without moving the weights to the tensor repository, and the next executor
fails. So each training executor ends exactly where Lightning will validate next, computed from
Lightning's own trigger (``_TrainingEpochLoop._should_check_val_fx``), or at ``max_steps``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from gigagpt.accelerators import private
from gigagpt.accelerators.bridge_errors import CerebrasClusterError, CerebrasError, import_cstorch
from gigagpt.accelerators.feeding import (
    Stream,
    cerebras_eval_factory,
    cerebras_train_loader,
    cluster_args,
    eval_batches,
)


def steps_until_validation(trainer, start: int, stream_length: int) -> int:
    """Training steps from global step ``start`` up to and including the next one Lightning validates after.

    Mirrors Lightning 2.6's ``_TrainingEpochLoop._should_check_val_fx``: a validation follows batch
    ``i`` when ``(i + 1) % val_check_batch == 0`` (``i`` counted in the epoch, or over the whole run
    with ``check_val_every_n_epoch=None``), and after the last batch of an epoch.
    """
    remaining = trainer.max_steps - start
    if not trainer.enable_validation:
        return remaining
    progress = trainer.fit_loop.epoch_loop.batch_progress
    in_epoch = progress.current.ready  # batches fetched in this epoch so far: the next one's index
    every_epoch = trainer.check_val_every_n_epoch
    if every_epoch is not None and (trainer.current_epoch + 1) % every_epoch != 0:
        return min(remaining, max(stream_length - in_epoch, 1))
    index = progress.total.ready if every_epoch is None else in_epoch
    interval = trainer.val_check_batch
    until = max(stream_length - in_epoch, 1)
    if isinstance(interval, int) and interval > 0:
        until = min(until, interval - index % interval)
    return min(remaining, until)


class ExecutorsMixin:
    """Training and evaluation executors of :class:`~gigagpt.accelerators.strategy.CerebrasStrategy`."""

    def process_dataloader(self, dataloader):
        trainer = self.lightning_module.trainer
        if trainer.training:
            return self._train_stream(trainer)
        if trainer.validating or trainer.sanity_checking or trainer.testing:
            return self._eval_stream(trainer, dataloader)
        raise CerebrasError(
            f'Trainer(accelerator="cerebras") supports fit, validate and test; {trainer.state.fn} is not '
            "supported: use a plain Trainer for prediction (`gigagpt sample` / `gigagpt export`)"
        )

    def _train_stream(self, trainer) -> Stream:
        if not trainer.max_steps or trainer.max_steps < 0:
            raise CerebrasError(
                'Trainer(accelerator="cerebras") needs trainer.max_steps: a Cerebras run is planned in '
                "steps (set e.g. --trainer.max_steps=1000)"
            )
        # (Lightning sets val_check_interval only when it counts batches, not for a time interval)
        if not isinstance(getattr(trainer, "val_check_interval", None), (int, float)):
            raise CerebrasError(
                "a time-based trainer.val_check_interval cannot be planned on Cerebras (each executor ends at "
                "the next validation); give it in batches"
            )
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_loader_args"):
            raise CerebrasError(
                "on Cerebras the training data must come from a DataModule with train_loader_args() "
                "(plain, picklable arguments of a module-level loader factory), such as GPTDataModule"
            )
        self._stream_length = 1 if self.validate_only or self.compile_only else trainer.max_steps
        return Stream(self._stream_length, self._next_train_batch)

    def _open_train_executor(self):
        cstorch = import_cstorch()
        trainer = self.lightning_module.trainer
        start = trainer.global_step
        num_steps = max(steps_until_validation(trainer, start, self._stream_length), 1)
        final = start + num_steps >= trainer.max_steps
        args = dict(trainer.datamodule.train_loader_args())
        args.update(start_step=start, num_steps=None, **cluster_args(self.backend_type, self.cluster))
        loader = cstorch.utils.data.DataLoader(cerebras_train_loader, args)
        activation = self.activation_steps or trainer.log_every_n_steps or 1
        executor = cstorch.utils.data.DataExecutor(
            loader,
            num_steps=num_steps,
            checkpoint_steps=self._checkpoint_schedule(start, num_steps, final),
            activation_steps=min(activation, num_steps),
        )
        self._train_executor, self._executor_start = executor, start
        self._queue_pending_saves()  # run at this executor's pre-initial step: the weights saves asked for
        return iter(executor)

    def _next_train_batch(self):
        if self._train_iter is not None:
            try:
                return self._advance(self._train_iter)
            except StopIteration:
                self._train_iter = self._train_executor = None
            if self.validate_only or self.compile_only:
                raise StopIteration
        self._train_iter = self._open_train_executor()
        return self._advance(self._train_iter)

    def _advance(self, iterator):
        with cluster_guard():
            return next(iterator)

    def _drain(self, iterator, executor) -> None:
        """End an executor at its last step: run the pending step's closures (and compile/execute on CSX).

        Only a run Lightning stops early (``trainer.should_stop``) ends an executor before its last
        step; no training executor follows it then.
        """
        with cluster_guard():
            if executor.on_final_iteration:
                for _ in iterator:
                    raise CerebrasError("a Cerebras executor yielded more batches than planned")
            else:
                private.backend_impl(self.backend).run_step_closures()
                iterator.close()

    def _finish_train_executor(self) -> None:
        """Run the last step's closures and end the executor (validation, end of training, early stop)."""
        if self._train_iter is None:
            return
        self._save_final_step()
        it, executor = self._train_iter, self._train_executor
        self._train_iter = self._train_executor = None
        self._drain(it, executor)

    def _eval_stream(self, trainer, dataloader) -> Stream:
        """Evaluation batches through a cstorch executor made afresh at each pass over the stream.

        Lightning asks for the loader once per fit and reuses it for the sanity check and every
        validation, deriving its own batch limits from ``len()``. So the stream's length is the
        loader's, and the number of steps of each pass is decided when the pass starts.
        """
        dm = trainer.datamodule
        one_step = self.validate_only or self.compile_only  # lower the evaluation step once, then stop
        stream = Stream(1 if one_step else len(dataloader), None)

        def start():
            self._close_eval_executor()
            n = 1 if one_step else eval_batches(trainer, len(dataloader))
            if n == 0 or (one_step and self._traced_eval is not None):
                return
            factory, args = cerebras_eval_factory(dm, dataloader, n, cluster_args(self.backend_type, self.cluster))
            cstorch = import_cstorch()
            loader = cstorch.utils.data.DataLoader(factory, args)
            self._eval_executor = cstorch.utils.data.DataExecutor(loader, num_steps=n)
            self._eval_iter = iter(self._eval_executor)

        def next_batch():
            if self._eval_iter is None:
                raise StopIteration
            return self._advance(self._eval_iter)

        stream.next_batch, stream.on_iter = next_batch, start
        return stream

    def _close_eval_executor(self) -> None:
        if self._eval_iter is None:
            return
        it, executor = self._eval_iter, self._eval_executor
        self._eval_iter = self._eval_executor = None
        self._drain(it, executor)


@contextmanager
def cluster_guard():
    """Turn "no cluster configured / reachable" failures into one CerebrasClusterError line."""
    try:
        yield
    except (StopIteration, CerebrasError):
        raise
    except Exception as err:
        wrapped = _cluster_error(err)
        if wrapped is None:
            raise
        raise wrapped from None


def _cluster_error(err: BaseException) -> CerebrasClusterError | None:
    text = f"{type(err).__name__}: {err}"
    if "ClusterConfigError" in text or "mgmt_address" in text or re.search(r"\bping(ed)?\b", text, re.IGNORECASE):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return CerebrasClusterError(
            f"no Cerebras cluster reachable ({first}); set the strategy's cluster.mgmt_address (and "
            "credentials_path, mount_dirs, python_paths) in the cluster config, e.g. configs/cerebras/cluster.yaml, "
            "or use validate_only: true to lower locally"
        )
    return None
