"""What both ends of a publish agree on besides the manifest: how a bucket is cut for the wire,
and how its bytes are authenticated.

A bucket travels as broadcasts of at most ``WIRE_CHUNK_BYTES`` each, so a member can start
authenticating the first part of a bucket while the rest is still arriving. After the last bucket
the learner broadcasts the MAC of every bucket (``MAC_BYTES`` each, in bucket order, with the
epoch's algorithm; see ``rendezvous.EpochKeys.bucket_mac``); every member compares them with its own and reports the
result in the closing all-reduce.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch

from services.weight_sync.rendezvous import BucketMac

# Large enough that a broadcast's fixed cost is noise, small enough that a member's hashing
# trails the network by a fraction of a bucket.
WIRE_CHUNK_BYTES = 16 * 1024 * 1024
MAC_BYTES = 32
# Device buckets are hashed through a host buffer of at most this size, so authenticating costs
# a bounded amount of host memory whatever the bucket size.
HASH_STAGING_BYTES = 16 * 1024 * 1024


def wire_chunks(flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of ``flat`` (1-D) as sent: consecutive pieces of at most ``WIRE_CHUNK_BYTES``."""
    step = max(1, WIRE_CHUNK_BYTES // flat.element_size())
    return [flat[start : start + step] for start in range(0, flat.numel(), step)]


Allocate = Callable[[int, torch.dtype, torch.device], torch.Tensor]


def _host_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def feed(mac: BucketMac, flat: torch.Tensor, allocate: Allocate = _host_empty) -> None:
    """Feed the raw bytes of ``flat`` (any dtype, reinterpreted as bytes) to ``mac``.

    CPU tensors are hashed in place; device tensors through a host buffer of at most
    ``HASH_STAGING_BYTES`` taken from ``allocate``. Hashing releases the GIL, so it runs on a
    worker thread alongside the next broadcast.
    """
    data = flat.detach().reshape(-1).view(torch.uint8)
    if data.device.type == "cpu":
        mac.update(data.numpy().data)
        return
    staging = allocate(min(data.numel(), HASH_STAGING_BYTES), torch.uint8, torch.device("cpu"))
    for start in range(0, data.numel(), staging.numel()):
        chunk = data[start : start + staging.numel()]
        part = staging[: chunk.numel()]
        part.copy_(chunk)
        mac.update(part.numpy().data)


class BufferAccount:
    """Receive buffers: bytes alive now and at most, and host memory kept for reuse.

    A buffer counts from ``empty`` until nothing references its memory any more (the consumer's
    views, of whatever shape or dtype, included). Host memory is then kept (at most ``keep``
    buffers, the largest) and lent again, so a publish does not pay the kernel for fresh pages
    bucket after bucket; device memory goes back to the caching allocator, which does the same.
    Thread-safe: buffers are taken on the caller's thread and may be freed on another.
    """

    def __init__(self, keep: int = 2) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._keep = keep
        self._kept: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        """Host memory held for the next buffers, not lent now."""
        with self._lock:
            return sum(a.nbytes for a in self._kept)

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        array: np.ndarray | None = None
        pooled = device.type == "cpu" and nbytes > 0
        with self._lock:
            if pooled:
                fits = [i for i, a in enumerate(self._kept) if a.nbytes >= nbytes]
                if fits:
                    array = self._kept.pop(min(fits, key=lambda i: self._kept[i].nbytes))
                else:
                    array = np.empty(nbytes, dtype=np.uint8)
            size = nbytes if array is None else array.nbytes
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if array is None:
            buffer = torch.empty(numel, dtype=dtype, device=device)
        else:
            buffer = torch.from_numpy(array)[:nbytes].view(dtype)
        # The storage outlives every view of it, however the consumer reinterprets them.
        weakref.finalize(buffer.untyped_storage(), self._freed, size, array)
        return buffer

    def _freed(self, nbytes: int, array: np.ndarray | None) -> None:
        with self._lock:
            self.live_bytes -= nbytes
            if array is not None:
                self._kept.append(array)
                self._kept.sort(key=lambda a: a.nbytes, reverse=True)
                del self._kept[self._keep :]

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_bytes = self.live_bytes
