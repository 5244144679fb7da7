"""Encoders trained for known models and shipped inside the package (``dashkv/shipped/<name>/``)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from torch import nn

from dashkv.encoders import CONFIG_NAME, HashEncoders, model_fingerprint, model_shape


def shipped_dir() -> Path:
    return Path(str(resources.files("dashkv") / "shipped"))


def shipped_encoders(model: nn.Module) -> HashEncoders:
    """The shipped encoders whose recorded model shape and fingerprint match ``model``.

    Raises
    ------
    ValueError
        When none match: pass encoders explicitly (``HashEncoders.from_pretrained`` or ``.random``).
    """
    shape, fingerprint = model_shape(model), model_fingerprint(model)
    root = shipped_dir()
    candidates = sorted(root.glob(f"*/{CONFIG_NAME}")) if root.is_dir() else []
    for config_path in candidates:
        config = json.loads(config_path.read_text())
        if config.get("model") == shape and config.get("fingerprint") == fingerprint:
            return HashEncoders.from_pretrained(config_path.parent)
    raise ValueError(
        f"no shipped encoders for this model (shape {shape}, fingerprint {fingerprint}); pass encoders= "
        "(dashkv.HashEncoders.from_pretrained(dir) after `dashkv train`, or dashkv.HashEncoders.random(model))"
    )
