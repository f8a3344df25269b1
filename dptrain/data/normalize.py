"""Per-channel scaling of samples of shape (C, H, W): pixels to [0, 1], then (x - mean) / std.

The statistics come from the training split (:func:`dptrain.data.channel_stats`) and travel in the
checkpoint, so evaluation and prediction apply the very values training used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Normalize:
    """x (n, C * H * W) -> (x * scale - mean[c]) / std[c] for the values of channel c, in x's dtype.

    scale : 1/255 for 8-bit pixels, 1 for data already in its units; mean, std : per channel, of
    the scaled values (std 0, a channel constant over the training split, is taken as 1: the
    channel is only centred); none (empty tuples) only scales. ``pixels`` = H * W.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: int

    @classmethod
    def from_stats(cls, scale: float, mean, std, pixels: int) -> Normalize:
        std = tuple(float(s) if s > 0 else 1.0 for s in std)
        return cls(float(scale), tuple(float(m) for m in mean), std, int(pixels))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """A new (n, D) array; ``x`` is left as it is (it may be a view of the data)."""
        out = np.multiply(x, x.dtype.type(self.scale)) if self.scale != 1 else np.array(x)
        if self.mean:
            blocks = out.reshape(len(out), len(self.mean), self.pixels)
            blocks -= np.array(self.mean, dtype=out.dtype)[:, None]
            blocks /= np.array(self.std, dtype=out.dtype)[:, None]
        return out

    def to_meta(self) -> dict[str, Any]:
        """For meta.json: floats written by repr, so they read back exactly."""
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "pixels": self.pixels}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Normalize:
        return cls(float(meta["scale"]), tuple(float(v) for v in meta["mean"]),
                   tuple(float(v) for v in meta["std"]), int(meta["pixels"]))
