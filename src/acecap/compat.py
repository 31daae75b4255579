"""Differences between the transformers lines acecap supports (4.57.x and 5.x), in one place."""

from __future__ import annotations

import transformers
from packaging.version import Version

VERSION = Version(transformers.__version__)
# 5.21 nests the thinker's parts: thinker.model.{audio_tower, visual, language_model}; 4.57 has
# thinker.{audio_tower, visual, model}. Checkpoints keep the old names and are renamed on load.
NESTED_THINKER = VERSION >= Version("5.21")


def thinker_parts(thinker):
    """The module that owns audio_tower and visual (the thinker itself before 5.21)."""
    return thinker.model if NESTED_THINKER else thinker


def register_weight_renames(subclass: type, parent: type) -> None:
    """Give a subclass of a transformers model the checkpoint renames of its parent.

    transformers 5.x looks renames up by class name and skips classes defined outside the library;
    4.57 keeps them as class attributes, which a subclass inherits.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:
        return
    renames = get_checkpoint_conversion_mapping(parent.__name__)
    if renames is not None:
        register_checkpoint_conversion_mapping(subclass.__name__, renames, overwrite=True)


def text_model(thinker):
    """The thinker's language model (embed_tokens, layers, norm, rotary_emb)."""
    return thinker.model.language_model if NESTED_THINKER else thinker.model
