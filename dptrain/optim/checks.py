"""Argument checks of the optimizers and schedules, made up front as tinygrad's optimizers make them."""


def require(ok: bool, message: str) -> None:
    """ValueError(message) unless ``ok``."""
    if not ok:
        raise ValueError(message)
