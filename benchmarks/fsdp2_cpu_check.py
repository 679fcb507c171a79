"""FSDP2 (``fully_shard``) on CPUs with gloo, for the evaluation in docs/gpu.md.

    python benchmarks/fsdp2_cpu_check.py raw        # GPT sharded per block, 1 vs 2 ranks: the losses
    python benchmarks/fsdp2_cpu_check.py lightning  # GPTModule under Lightning's ModelParallelStrategy, 2 CPU ranks

Nothing here is timed: it shows whether the path runs and trains the same, not how fast or how much
memory it takes (that needs GPUs).
"""

import os
import sys

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from gigagpt.model import GPT, GPTConfig
from gigagpt.module import GPTModule
from gigagpt.optim import OptimConfig

CFG = GPTConfig(vocab_size=64, max_position_embeddings=16, depth=2, width=32, heads=2)
STEPS = 4


def batches(world: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (4, 16), generator=g).chunk(world)[rank] for _ in range(STEPS)]


def run(rank: int, world: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(CFG)
    if world > 1:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x in batches(world, rank):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    if rank == 0:
        q.put(losses)
    if world > 1:
        dist.destroy_process_group()


class Sharded(GPTModule):
    def configure_model(self):
        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(i))
        return x[:-1], x[1:]


def lightning_run() -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    trainer.fit(Sharded(CFG, OptimConfig(lr=1e-2)), torch.utils.data.DataLoader(Windows(), batch_size=2))
    if trainer.global_rank == 0:
        print("ModelParallelStrategy + fully_shard on 2 CPU ranks: steps", trainer.global_step)


if __name__ == "__main__":
    if sys.argv[1:] == ["lightning"]:
        lightning_run()
    else:
        q = mp.get_context("spawn").Queue()
        run(0, 1, q)
        one = q.get()
        mp.spawn(run, args=(2, q), nprocs=2, join=True)
        two = q.get()
        print("1 rank: ", one)
        print("2 ranks:", two)
        print("max abs difference", max(abs(a - b) for a, b in zip(one, two)))
