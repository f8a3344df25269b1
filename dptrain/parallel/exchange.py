"""The gradient exchange: sum the flat gradient buffer over all ranks, divide by the global batch.

Three ways, one result (the mean gradient over the global batch, identical on every rank):

* one in-place Allreduce after backward (``bucket_bytes = 0``);
* buckets: contiguous slices of the buffer, last layers first, each started with a non-blocking
  Iallreduce as soon as backward has finished the layers it holds, so the exchange of the last
  layers overlaps the backward pass of the first ones (Horovod's tensor fusion, PyTorch DDP's
  buckets);
* ``compression = "fp16"``: each bucket goes out in half precision (half the bytes) through an
  Alltoall; each rank sums its block of the buffer in the training dtype, and the sums are
  allgathered, again in half precision. Each bucket is scaled by a power of two agreed by all
  ranks, so values are neither subnormal nor overflowing in fp16.

The optimizer never sees any of this: it finds the averaged gradient in ``model.grad_buffer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dptrain.nn import Sequential


@dataclass
class Bucket:
    start: int  # slice of the flat gradient buffer
    stop: int
    first_layer: int  # the bucket is ready once backward has finished this layer (the lowest it holds)
    pending: object = None
    send16: np.ndarray | None = None  # fp16 compression buffers, allocated once
    recv16: np.ndarray | None = None


FP16_TARGET = 2.0**14  # the largest |sum over ranks| aimed for, well under fp16's 65504


def plan_buckets(model: Sequential, bucket_bytes: int) -> list[Bucket]:
    """Group parameters, last layer first, into buckets of at least ``bucket_bytes`` (layer-aligned).

    ``bucket_bytes = 0`` gives one bucket for the whole buffer, exchanged after backward. Frozen
    parameters (``model.freeze``) are left out: a bucket also ends where one lies between two others.
    """
    specs = sorted((s for s in model.param_specs if s.name not in model.frozen), key=lambda s: s.offset, reverse=True)
    if not specs:
        return []
    if bucket_bytes <= 0 and not model.frozen:
        return [Bucket(0, model.n_params, 0)]
    itemsize = model.dtype.itemsize
    buckets: list[Bucket] = []
    stop = specs[0].offset + specs[0].size
    for i, spec in enumerate(specs):
        below = specs[i + 1] if i + 1 < len(specs) else None
        if below is None or below.offset + below.size != spec.offset:  # the end, or a frozen span below
            buckets.append(Bucket(spec.offset, stop, spec.layer_index))
            stop = below.offset + below.size if below is not None else 0
        elif bucket_bytes > 0 and below.layer_index != spec.layer_index and (stop - spec.offset) * itemsize >= bucket_bytes:
            buckets.append(Bucket(spec.offset, stop, spec.layer_index))
            stop = spec.offset
    return buckets


class GradientExchange:
    """Averages ``model.grad_buffer`` over ``comm`` after each backward pass.

    Usage per step: ``model.backward(dz, after_layer=exchange.layer_done)`` (starts buckets as they
    become ready), then ``scale = exchange.finish(global_batch_size)`` and ``optimizer.step(scale)``.
    """

    def __init__(self, comm, model: Sequential, bucket_bytes: int = 0, compression: str = "none") -> None:
        if compression not in ("none", "fp16"):
            raise ValueError(f"unknown compression {compression!r}")
        self.comm, self.model, self.compression = comm, model, compression
        self.buckets = plan_buckets(model, bucket_bytes)
        self.overlap = bucket_bytes > 0 and comm.size > 1 and compression == "none"
        self._by_layer: dict[int, list[Bucket]] = {}  # the buckets a layer completes (several: frozen gaps)
        for b in self.buckets:
            self._by_layer.setdefault(b.first_layer, []).append(b)
        self._peaks = np.zeros(len(self.buckets), dtype=np.float64)  # fp16: each bucket's largest |value|
        self._started: list[Bucket] = []
        if compression == "fp16" and comm.size > 1:
            for b in self.buckets:
                block = -(-(b.stop - b.start) // comm.size)  # ceil: every rank owns one block
                b.send16 = np.zeros(block * comm.size, dtype=np.float16)
                b.recv16 = np.empty(block * comm.size, dtype=np.float16)

    # -- during backward ---------------------------------------------------------------------

    def layer_done(self, layer_index: int) -> None:
        """Called by backward after each layer: start the bucket this layer completes, drive progress
        (of the buckets started and not yet complete; finish() waits on every bucket)."""
        if self._started:
            self._started = [b for b in self._started if not b.pending.test()]
        for bucket in self._by_layer.get(layer_index, ()) if self.overlap else ():
            grads = self.model.grad_buffer[bucket.start : bucket.stop]
            bucket.pending = self.comm.iallreduce_sum(grads)
            self._started.append(bucket)

    # -- after backward ----------------------------------------------------------------------

    def finish(self, global_batch_size: int) -> float:
        """Complete every bucket. grad_buffer then holds the gradient SUMMED over the global batch on
        every rank; returns the factor that makes it the mean (1 / global batch size), which the
        optimizer applies in its own pass."""
        grads = self.model.grad_buffer
        if self.comm.size == 1:
            return 1.0 / global_batch_size
        if self.compression == "fp16":
            peaks = self._peaks
            for i, b in enumerate(self.buckets):
                seg = grads[b.start : b.stop]
                peaks[i] = max(seg.max(), -seg.min()) if len(seg) else 0.0  # no temporary, NaN propagates
            self.comm.allreduce_max(peaks)  # one small blocking call for all the buckets
            for b, peak in zip(self.buckets, peaks):
                self._exchange_fp16(b, float(peak))
            return 1.0 / global_batch_size
        if self.overlap:
            for b in self.buckets:
                if b.pending is None:  # a bucket whose layers had no after_layer call
                    b.pending = self.comm.iallreduce_sum(grads[b.start : b.stop])
                b.pending.wait()
                b.pending = None
            self._started.clear()
        else:  # one bucket for the whole buffer, unless frozen spans split it
            for b in self.buckets:
                self.comm.allreduce_sum(grads[b.start : b.stop])
        return 1.0 / global_batch_size

    def _exchange_fp16(self, b: Bucket, peak: float) -> None:
        """Half-precision transport, sums in the training dtype: Alltoall, local sum, Allgather.

        The bucket is first multiplied by a power of two, the same on every rank, chosen from
        ``peak``, its largest magnitude on any rank, so that the sum over the ranks stays below
        fp16's maximum (65504) while small gradients stay clear of its subnormals (< 6e-5:
        imprecise, and ~10x slower to convert). Powers of two scale without rounding; the scale is undone on arrival.
        """
        size = self.comm.size
        seg = self.model.grad_buffer[b.start : b.stop]
        exponent = 0
        if 0 < peak < np.inf:
            exponent = int(np.floor(np.log2(FP16_TARGET / (peak * size))))
        scale = 2.0**exponent  # may be NaN/inf-free; a NaN gradient stays NaN and is caught after
        n, block = len(seg), len(b.send16) // size
        seg *= scale
        np.copyto(b.send16[:n], seg, casting="same_kind")
        self.comm.alltoall(b.send16, b.recv16)  # block i of recv16: rank i's values of my block
        mine = b.recv16.reshape(size, block).astype(seg.dtype).sum(axis=0)  # in the training dtype
        gathered = self.comm.allgather(mine.astype(np.float16))  # (size, block)
        np.copyto(seg, gathered.reshape(-1)[:n])  # a plain cast: a ufunc would compute in software fp16
        seg *= 1.0 / scale
