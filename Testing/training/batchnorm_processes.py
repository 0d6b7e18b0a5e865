"""One of two processes of the global batch-norm test (``test_training.py``), started by torchrun as the trainer is.

Each process takes every other sample of one seeded batch, runs a step of a network whose batch norm is
:func:`Training.distributed.convert_batchnorm`'s, and rank 0 writes the gradients and running statistics with those
of the same network run in one process on the whole batch (in the order the two halves make), for the test to
compare. ``python -m torch.distributed.run --standalone --nproc_per_node=2 batchnorm_processes.py OUT``.
"""

from __future__ import annotations

import sys

import torch

from Training.distributed import convert_batchnorm, setup, teardown


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))


def _state(network: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {"grads": {name: p.grad for name, p in network.named_parameters()},
            "running": {name: b for name, b in network.named_buffers()}}


def main(out: str) -> None:
    context = setup("cpu")
    try:
        generator = torch.Generator().manual_seed(1)
        images, targets = torch.randn(6, 3, 12, 12, generator=generator), torch.rand(6, 1, 12, 12, generator=generator)
        network = convert_batchnorm(_network())
        ddp = torch.nn.parallel.DistributedDataParallel(network)
        part = slice(context.rank, None, context.world_size)
        ((ddp(images[part]) - targets[part]) ** 2).mean().backward()
        if context.is_main:
            whole = _network()
            order = torch.cat([torch.arange(r, 6, context.world_size) for r in range(context.world_size)])
            ((whole(images[order]) - targets[order]) ** 2).mean().backward()
            torch.save({"distributed": _state(network), "whole": _state(whole)}, out)
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])
