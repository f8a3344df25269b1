"""Sizes and windows shared by convolution and pooling: an int or a pair of ints, the output size of a
window moved over an image (or along a sequence), and the input slices each window offset reads."""

from __future__ import annotations

import numpy as np

from .layers import Layer


def as_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (along H, along W); ValueError naming ``name`` for anything else."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
    return int(pair[0]), int(pair[1])


def sized_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """:func:`as_pair`, and ValueError if any is below ``minimum``."""
    pair = as_pair(value, name)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def sized_int(value, name: str, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``; ValueError naming ``name`` otherwise
    (the sizes of the 1-D layers)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def show_pair(pair: tuple[int, int]) -> str:
    """(3, 3) -> "3", (3, 1) -> "(3, 1)", for describe()."""
    return str(pair[0]) if pair[0] == pair[1] else f"({pair[0]}, {pair[1]})"


def window_output(layer: Layer, in_shape: tuple[int, ...], window: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(Ho, Wo) for samples of ``in_shape`` = (C, H, W); ValueError naming the layer otherwise."""
    if len(in_shape) != 3:
        raise ValueError(f"{layer.describe()} takes images of shape (channels, height, width), "
                         f"got sample shape {tuple(in_shape)}")
    _, H, W = in_shape
    if min(in_shape) < 1:
        raise ValueError(f"{layer.describe()} takes non-empty images, got sample shape {tuple(in_shape)}")
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    if Hp < window[0] or Wp < window[1]:
        padded = f" (padded to {Hp}x{Wp})" if padding != (0, 0) else ""
        raise ValueError(f"{layer.describe()}: the output would be empty: input {H}x{W}{padded} is smaller "
                         f"than the {window[0]}x{window[1]} window (sample shape {tuple(in_shape)})")
    return (Hp - window[0]) // stride[0] + 1, (Wp - window[1]) // stride[1] + 1


def length_output(layer: Layer, in_shape: tuple[int, ...], window: int, stride: int, padding: int = 0) -> int:
    """The output length Lo = (L + 2 * padding - window) // stride + 1 for samples of ``in_shape`` = (C, L);
    ValueError naming the layer otherwise."""
    if len(in_shape) != 2:
        raise ValueError(f"{layer.describe()} takes sequences of shape (channels, length), "
                         f"got sample shape {tuple(in_shape)}")
    if min(in_shape) < 1:
        raise ValueError(f"{layer.describe()} takes non-empty sequences, got sample shape {tuple(in_shape)}")
    length = in_shape[1] + 2 * padding
    if length < window:
        padded = f" (padded to {length})" if padding else ""
        raise ValueError(f"{layer.describe()}: the output would be empty: length {in_shape[1]}{padded} is shorter "
                         f"than the window of {window} (sample shape {tuple(in_shape)})")
    return (length - window) // stride + 1


def offset_slices(Ho: int, Wo: int, window: tuple[int, int], stride: tuple[int, int]):
    """For each offset (a, b) of a window, row-major: the (rows, cols) slices of the (padded)
    input that the (Ho, Wo) windows see at that offset."""
    sh, sw = stride
    return [(slice(i, i + sh * (Ho - 1) + 1, sh), slice(j, j + sw * (Wo - 1) + 1, sw))
            for i in range(window[0]) for j in range(window[1])]
