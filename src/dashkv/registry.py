"""Registering an attention function with transformers so that the registration takes effect.

``AttentionInterface.register`` writes transformers' class-wide mapping, but a *local* entry of the
same name on the shared ``ALL_ATTENTION_FUNCTIONS`` instance wins over it. Importing kvpress makes
such entries: it wraps every function registered at that moment (for its head-wise presses) and
stores the wrappers locally. A name registered again after that import -- a recorder made per call,
as ``dashkv train`` and the evaluation register -- would keep calling the stale function (``dashkv
train`` after a benchmark with a SnapKV row collected nothing).
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def register_attention(name: str, function: Callable, mask: Callable | None = None) -> None:
    """Register ``function`` (and, if given, the ``mask`` function) under ``name``, dropping any local
    override of ``name`` that would shadow it."""
    AttentionInterface.register(name, function)
    try:
        del ALL_ATTENTION_FUNCTIONS[name]  # the local entry only (GeneralInterface.__delitem__)
    except KeyError:
        pass
    if mask is not None:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
