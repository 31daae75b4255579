"""Differences between the transformers lines acecap supports (4.57.x and 5.x), in one place."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

VERSION = Version(transformers.__version__)
# 5.21 nests the thinker's parts: thinker.model.{audio_tower, visual, language_model}; 4.57 has
# thinker.{audio_tower, visual, model}. Checkpoints keep the old names and are renamed on load.
NESTED_THINKER = VERSION >= Version("5.21")
# 4.57's audio encoder attends within 2 s chunks but builds one dense mask over every chunk it is
# given: memory and attention time grow with the square of a call's audio (5.x attends chunk by chunk).
DENSE_AUDIO_MASK = VERSION < Version("5")
# So on 4.57 each encoder call gets at most this many chunks (32 s): its mask stays ~10 MB.
CHUNKS_PER_CALL = 16


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


def audio_embeddings(thinker, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """The audio encoder's output for a batch, one row per audio token, clips concatenated."""
    if not DENSE_AUDIO_MASK:
        return thinker.get_audio_features(features, feature_attention_mask=feature_mask).last_hidden_state
    tower = thinker_parts(thinker).audio_tower
    window = 2 * tower.n_window  # mel frames in a chunk
    # Pieces are whole chunks (a clip's last may be short), and chunks are encoded and pooled
    # independently, so a clip's rows are its pieces' rows in order, however the calls group them.
    pieces = [
        features[i, :, start : min(start + window * CHUNKS_PER_CALL, length)]
        for i, length in enumerate(feature_mask.sum(1).tolist())
        for start in range(0, length, window * CHUNKS_PER_CALL)
    ]
    calls, chunks = [[]], 0
    for piece in pieces:
        size = -(-piece.shape[1] // window)
        if chunks + size > CHUNKS_PER_CALL:
            calls.append([])
            chunks = 0
        calls[-1].append(piece)
        chunks += size
    rows = []
    for call in calls:
        lengths = torch.tensor([piece.shape[1] for piece in call], device=features.device)
        after_cnn, _ = tower._get_feat_extract_output_lengths(lengths)
        rows.append(tower(torch.cat(call, dim=1), feature_lens=lengths, aftercnn_lens=after_cnn).last_hidden_state)
    return torch.cat(rows)
