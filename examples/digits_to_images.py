"""Write scikit-learn's digits as PNG files in class folders, the layout ``data.name = "images"`` reads
(torchvision's ImageFolder layout): OUT/train/<digit>/<n>.png and OUT/val/<digit>/<n>.png.

    python examples/digits_to_images.py digits_images            # 16x16 grey PNGs, 20% held out in val/
    dptrain train --config digits_images --out runs/images       # reads digits_images/train and val
    dptrain launch -n 2 --config digits_images --out runs/images

Each 8x8 digit (values 0..16) is scaled to 0..255 and enlarged to ``--size`` pixels (nearest
neighbour). The validation digits are a fixed, seeded 20% of the 1,797, so every run holds out the
same ones. ``--colour`` tints each class (RGB files), ``--per-class`` writes only the first N of each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(root: Path, size: int = 16, colour: bool = False, per_class: int | None = None,
                 first: int = 0, samples=None) -> int:
    """Write digits as root/<digit>/<index>.png; ``samples`` the indices to write (default: all from
    ``first`` on), at most ``per_class`` of each digit. Returns how many files were written."""
    digits = load_digits()
    samples = range(first, len(digits.target)) if samples is None else samples
    taken = dict.fromkeys(range(10), 0)
    for i in samples:
        label = int(digits.target[i])
        if per_class is not None and taken[label] >= per_class:
            continue
        taken[label] += 1
        image = (np.kron(digits.images[i], np.ones((size // 8, size // 8))) * (255 / 16)).round().astype(np.uint8)
        if colour:  # each digit its own tint
            tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53 + 80) % 256]) / 255
            image = (image[..., None] * tint).round().astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(label) / f"{i:04d}.png")
    return sum(taken.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write train/ and val/ into")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels, a multiple of 8 (default 16)")
    parser.add_argument("--colour", action="store_true", help="tint each class: RGB images")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share held out in val/ (default 0.2)")
    args = parser.parse_args()
    if args.size % 8 or args.size < 8:
        parser.error(f"--size must be a multiple of 8, got {args.size}")
    n = len(load_digits().target)
    held_out = np.random.default_rng(0).permutation(n)[: round(n * args.val_fraction)]
    val = set(held_out.tolist())
    train = write_digits(args.out / "train", args.size, args.colour, samples=[i for i in range(n) if i not in val])
    test = write_digits(args.out / "val", args.size, args.colour, samples=sorted(val))
    print(f"wrote {train} training and {test} validation images ({args.size}x{args.size}) to {args.out}")


if __name__ == "__main__":
    main()
