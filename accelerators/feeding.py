"""Input functions shipped to Cerebras input workers, and what Lightning iterates in place of a loader.

On a cluster the input function runs on ``num_csx * num_workers_per_csx`` streamer tasks. Each task
streams to one system (``wse_id``); a system's appliance steps are dealt round-robin over its
workers by local worker id (``cerebras/pytorch/utils/data/dataloader.py: DataLoaderCheckpoint``:
``global_worker_id = wse_id * num_workers_per_csx + local_worker_id``, ``worker_step`` = the
appliance step dealt round-robin). So the worker ``(wse, local)`` of an executor that starts at
global step ``start`` streams, as its k-th batch, system ``wse``'s share of global step
``start + local + k * num_workers_per_csx``: every window of the epoch is read exactly once, by one
system, whatever the validations and resumes in between.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

# Tokens travel as int32 (half the bytes of int64); vocabularies fit with room to spare.
CLUSTER_TOKEN_DTYPE = torch.int32


class Stream:
    """What Lightning iterates in place of a DataLoader: batches from cstorch executors.

    ``__len__`` lets Lightning's fetcher skip its look-ahead: each Lightning batch advances the
    executor exactly once, so the step closures of step k run when batch k+1 is fetched.
    """

    def __init__(self, length: int, next_batch, on_iter=None):
        self.length, self.next_batch, self.on_iter = length, next_batch, on_iter

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        if self.on_iter is not None:
            self.on_iter()
        for _ in range(self.length):
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch


class _Strided(torch.utils.data.Sampler):
    """Batches of global steps ``first, first + stride, ...`` of a :class:`gigagpt.data.StepSampler`."""

    def __init__(self, steps, first: int, stride: int):
        self.steps, self.first, self.stride = steps, first, stride

    def __iter__(self):
        step = self.first
        while True:
            yield self.steps.batch_indices(step)
            step += self.stride


def _as_cluster_tokens(batch):
    return tuple(t.to(CLUSTER_TOKEN_DTYPE) for t in torch.utils.data.default_collate(batch))


def streamer_position(num_csx: int, workers_per_csx: int) -> tuple[int, int] | None:
    """``(wse_id, local_worker_id)`` of this input worker, or ``None`` off the cluster."""
    try:
        import cerebras.pytorch.distributed as dist
    except ImportError:
        return None
    if not dist.is_streamer():
        return None
    return divmod(dist.get_streaming_rank(), workers_per_csx)


def _cluster_share(args: dict, position: tuple[int, int] | None):
    """``(args, dataset, wse, local, num_csx, workers)`` of an input worker, or ``(args, None, ...)``
    where the plain loader serves (off the cluster, without cluster tokens)."""
    from gigagpt.data import WindowDataset

    args = dict(args)
    num_csx, workers = args.pop("num_csx", 1), args.pop("workers_per_csx", 1)
    cluster_tokens = args.pop("cluster_tokens", False)
    if position is None and not cluster_tokens:
        return args, None, 0, 0, 1, 1
    wse, local = position or (0, 0)
    num_csx, workers = (num_csx, workers) if position is not None else (1, 1)
    # the worker's dataset opens (or fetches) only the shards its windows touch
    dataset = WindowDataset(args["path"], args["sequence_length"], args.get("dtype", "uint16"), args.get("cache"))
    return args, dataset, wse, local, num_csx, workers


def train_loader_for(args: dict, position: tuple[int, int] | None) -> DataLoader:
    """The loader of one input worker at ``position`` (``None``: the whole global batch, in order)."""
    from gigagpt.data import StepSampler, build_train_loader

    args, dataset, wse, local, num_csx, workers = _cluster_share(args, position)
    if dataset is None:
        return build_train_loader(**args)
    if args["batch_size"] % num_csx:
        raise ValueError(f"data.batch_size={args['batch_size']} must divide evenly over cluster.num_csx={num_csx}")
    steps = StepSampler(len(dataset), args["batch_size"] // num_csx, args["seed"], 0, wse, num_csx)
    sampler = _Strided(steps, args.get("start_step", 0) + local, workers)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_cluster_tokens)


def eval_loader_for(args: dict, position: tuple[int, int] | None) -> DataLoader:
    """Evaluation windows in order; each system takes its share of every global batch."""
    from gigagpt.data import build_eval_loader

    args, dataset, wse, local, num_csx, workers = _cluster_share(args, position)
    if dataset is None:
        return build_eval_loader(**args)
    batch, max_batches = args["batch_size"], args.get("max_batches")
    n = len(dataset) // batch * batch
    if max_batches is not None:
        n = min(n, max_batches * batch)
    share = batch // num_csx
    # global batch b holds windows [b*batch, (b+1)*batch); system wse takes its share of each
    batches = [list(range(b * batch + wse * share, b * batch + (wse + 1) * share)) for b in range(n // batch)]
    mine = batches[local::workers]
    return DataLoader(dataset, batch_sampler=mine, collate_fn=_as_cluster_tokens)


def cerebras_train_loader(args: dict):
    """Module-level input function shipped to Cerebras input workers (picklable arguments only)."""
    return train_loader_for(args, streamer_position(args.get("num_csx", 1), args.get("workers_per_csx", 1)))


def cerebras_eval_loader(args: dict):
    """Module-level evaluation input function (see :func:`cerebras_train_loader`)."""
    return eval_loader_for(args, streamer_position(args.get("num_csx", 1), args.get("workers_per_csx", 1)))


def cluster_args(backend_type: str, cluster) -> dict:
    """What every input function needs to know of the cluster it feeds."""
    return {"num_csx": cluster.num_csx, "workers_per_csx": cluster.workers_per_csx,
            "cluster_tokens": backend_type == "CSX"}


def eval_batches(trainer, length: int) -> int:
    """How many batches Lightning takes from a loader of ``length`` in the running evaluation."""
    limit = trainer.limit_test_batches if trainer.testing else trainer.limit_val_batches
    n = min(length, limit) if isinstance(limit, int) else int(length * limit)
    if trainer.sanity_checking:
        n = min(n, trainer.num_sanity_val_steps)  # -1 ("all") is float("inf") in the Trainer
    return max(int(n), 0)


def cerebras_eval_factory(dm, dataloader, num_batches: int, extra: dict):
    """A picklable (factory, args) pair for evaluation batches."""
    files = getattr(dm, "files", None)
    if files is not None and hasattr(dm, "sequence_length"):
        return cerebras_eval_loader, {
            "path": files.val, "sequence_length": dm.sequence_length, "batch_size": dm.batch_size,
            "dtype": files.dtype, "max_batches": max(num_batches, 1), "cache": files.cache, **extra,
        }
    return _return_loader, dataloader


def _return_loader(loader):
    return loader
