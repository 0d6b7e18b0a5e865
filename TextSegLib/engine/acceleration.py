"""What makes the slice engine fast without changing its results: BatchNorm folding, ``torch.compile`` with an eager
fall-back, and the double-buffered CUDA pipeline that overlaps copies with compute (the CPU batch size is
:mod:`.batching`'s)."""

from __future__ import annotations

import logging
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from TextSegLib.core.messages import first_line
from TextSegLib.text.features import TextFeatures

__all__ = [
    "fold_batchnorm",
]

log = logging.getLogger("textseg")


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` into the
    convolution's weights (the BatchNorm becomes an identity). Same outputs up to rounding, one pass fewer over
    every such feature map. Modifies and returns ``network``, which must be in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode")
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, first), (next_name, second) in pairwise(children):
            if type(first) is nn.Conv2d and type(second) is nn.BatchNorm2d and second.track_running_stats:
                setattr(module, name, fuse_conv_bn_eval(first, second))
                setattr(module, next_name, nn.Identity())
    return network


class _CompiledOrEager(nn.Module):
    """``torch.compile`` of a network that falls back to the eager network if compilation fails.

    Inputs are padded to the largest batch seen so the compiled graph (and, on CUDA, its captured CUDA graph) is
    reused for the last, shorter batch of a volume; the text must be one prompt for every row, as the engine
    passes it. Shapes: as the wrapped network.
    """

    def __init__(self, network: nn.Module, mode: str | None) -> None:
        super().__init__()
        self.network = network
        self.mode = mode
        self.compiled = None
        self.batch = 0
        self.failed = False

    def forward(self, image: torch.Tensor, text):
        if self.failed:
            return self.network(image, text)
        if self.compiled is None:
            self.compiled = torch.compile(self.network, mode=self.mode, dynamic=False)
        count = image.shape[0]
        self.batch = max(self.batch, count)
        padded = image
        if count < self.batch:
            padded = torch.cat([image, image[-1:].expand(self.batch - count, *image.shape[1:])])
        prompt = TextFeatures(text.tokens[:1], text.mask[:1], text.pooled[:1]).expand(self.batch)
        try:
            return self.compiled(padded, prompt)[:count]
        except Exception as error:  # compilation problems surface as many exception types
            log.warning("torch.compile failed (%s); running uncompiled", first_line(error))
            self.failed = True
            return self.network(image, text)


class _CudaStreams:
    """The CUDA side of :class:`_StagedPipeline`: pinned host memory, a copy stream and events."""

    pinned = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def upload(self, host: torch.Tensor):
        with torch.cuda.stream(self.copy_stream):
            uploaded = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return uploaded, ready

    def wait(self, uploaded: torch.Tensor, ready) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        uploaded.record_stream(stream)

    def download(self, host: torch.Tensor, result: torch.Tensor):
        host.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done


class _SynchronousStreams:
    """Stand-in for :class:`_CudaStreams` where every copy is complete when it returns (CPU tests of the
    pipeline's bookkeeping)."""

    pinned = False

    class _Done:
        def synchronize(self) -> None:
            """Nothing to wait for."""

    def upload(self, host: torch.Tensor):
        return host.clone(), self._Done()

    def wait(self, uploaded: torch.Tensor, ready) -> None:
        """Nothing to wait for."""

    def download(self, host: torch.Tensor, result: torch.Tensor):
        host.copy_(result)
        return self._Done()


class _StagedPipeline:
    """Double-buffered host staging with uploads and downloads overlapped with compute, for one volume.

    ``run(start, stop, ...)`` computes batch ``[start, stop)`` (uploading it unless it was prefetched), then, while
    the device works, writes the previous batch's result into ``output`` once its download has finished and
    prefetches the next batch into the other staging buffer; the result's download is queued. ``finish()`` writes
    the last result. On CUDA the buffers are pinned and the copies run on a side stream.
    """

    def __init__(self, streams, canonical: np.ndarray, output: np.ndarray) -> None:
        self.streams, self.canonical, self.output = streams, canonical, output
        self.pending: tuple[int, int, torch.Tensor, object] | None = None
        self.host_in: list[torch.Tensor] = []
        self.host_out: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Forget staged batches (after an out-of-memory error); a finished download is kept."""
        self._drain()
        self.prefetched: tuple[int, int, torch.Tensor, object] | None = None
        self.slot = 0

    def _buffers(self, batch_size: int) -> None:
        if not self.host_in or self.host_in[0].shape[0] < batch_size:
            shape = (batch_size, *self.canonical.shape[1:])
            pinned = self.streams.pinned
            self.host_in = [torch.empty(shape, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]
            self.host_out = [torch.empty(shape, dtype=torch.float32, pin_memory=pinned) for _ in range(2)]

    def _upload(self, start: int, stop: int, slot: int):
        staging = self.host_in[slot][: stop - start]
        staging.copy_(torch.from_numpy(np.ascontiguousarray(self.canonical[start:stop], dtype=np.float32)))
        return (start, stop, *self.streams.upload(staging))

    def _drain(self) -> None:
        if self.pending is not None:
            start, stop, host, done = self.pending
            done.synchronize()
            self.output[start:stop] = host.numpy()
            self.pending = None

    def run(self, start: int, stop: int, batch_size: int, compute) -> None:
        self._buffers(batch_size)
        if self.prefetched is not None and self.prefetched[:2] == (start, stop):
            _, _, batch, ready = self.prefetched
        else:
            _, _, batch, ready = self._upload(start, stop, self.slot)
        self.prefetched = None
        self.streams.wait(batch, ready)
        probabilities = compute(batch)  # queued on the device; the host goes on
        self._drain()  # the previous batch's result, and its buffers become free
        following = min(stop + batch_size, self.canonical.shape[0])
        if stop < following:
            self.prefetched = self._upload(stop, following, 1 - self.slot)
        host = self.host_out[self.slot][: stop - start]
        self.pending = (start, stop, host, self.streams.download(host, probabilities))
        self.slot = 1 - self.slot

    def finish(self) -> None:
        self._drain()
