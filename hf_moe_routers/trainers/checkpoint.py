"""Checkpoints that keep the in-memory (fused) expert layout."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn

__all__ = ["fused_layout_saves"]


@contextlib.contextmanager
def fused_layout_saves(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model.save_pretrained`` writes the in-memory tensor layout.

    ``save_pretrained`` writes MoE experts back in the legacy per-expert layout by default, but
    ``Trainer._load_from_checkpoint`` reads the file with a raw ``load_state_dict(strict=False)``
    that applies no conversion: on resume the fused experts would silently keep their fresh values
    (only a warning lists them as missing). So checkpoints keep the fused layout; final models
    (``save_model``) keep the default, interoperable one; ``from_pretrained`` reads both.
    """
    original = model.__dict__.get("save_pretrained")
    model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_original_format=False)
    try:
        yield
    finally:
        if original is None:
            del model.save_pretrained
        else:
            model.save_pretrained = original
