"""The lean model: the thinker alone (audio encoder + LLM), its processor, tasks and prompts."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from . import compat


@dataclass(frozen=True)
class Task:
    """What to ask the model, and which checkpoint answers it."""

    name: str
    model_id: str
    prompt: str


# What AudioThinker holds for the released 7B checkpoints (tests/test_model.py checks it on the 7B config).
RESIDENT_PARAMETERS_7B = 8_255_263_744

TASKS = {
    "caption": Task("caption", "ACE-Step/acestep-captioner", "*Task* Describe this audio in detail"),
    "lyrics": Task("lyrics", "ACE-Step/acestep-transcriber", "*Task* Transcribe this audio in detail"),
}


class AudioThinker(Qwen2_5OmniThinkerForConditionalGeneration):
    """Qwen2.5-Omni's thinker without its vision encoder: audio and text in, text out.

    Loading this class from the full checkpoint reads only thinker weights (the talker and token2wav
    are skipped, and no spk_dict.pt is needed) and never allocates the 677 M-parameter vision tower.
    """

    # Weights in the checkpoint that this class deliberately has no place for.
    _keys_to_ignore_on_load_unexpected = [r"visual\.", r"^talker\.", r"^token2wav\."]

    def __init__(self, config: Qwen2_5OmniThinkerConfig):
        super().__init__(config)
        # Image and video inputs are never passed, so the forward pass never touches `visual`.
        del compat.thinker_parts(self).visual


compat.register_weight_renames(AudioThinker, Qwen2_5OmniThinkerForConditionalGeneration)


class CheckpointError(RuntimeError):
    """A model folder that does not hold a usable Qwen2.5-Omni checkpoint."""


def thinker_config(folder: str | Path) -> Qwen2_5OmniThinkerConfig:
    """The thinker's config from a full (or thinker-only) checkpoint's config.json."""
    with quiet_token_id_checks():
        return Qwen2_5OmniThinkerConfig.from_pretrained(folder)


def load_thinker(folder: str | Path, device: torch.device, dtype: torch.dtype) -> AudioThinker:
    """Load the thinker's weights straight onto `device`; fail loudly if any are missing."""
    model, info = AudioThinker.from_pretrained(
        folder,
        dtype=dtype,
        device_map={"": device},
        attn_implementation="sdpa",
        output_loading_info=True,
    )
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = ", ".join(sorted(map(str, list(missing) + list(mismatched)))[:5])
        raise CheckpointError(
            f"{folder}: checkpoint does not match the Qwen2.5-Omni thinker (missing or mismatched: {shown})"
        )
    return model.eval()


class _TalkerTokenIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "must be `None` or an integer within the vocabulary" not in record.getMessage()


@contextmanager
def quiet_token_id_checks():
    """transformers 5.x checks every sub-config's token ids against a vocabulary, and the full checkpoint's
    configs name the thinker's audio and talker ids (151647 and up) beside the talker's 8,448-token vocabulary.
    The checkpoint is as released and acecap never loads the talker: those seven warnings say nothing."""
    config_log, quiet = logging.getLogger("transformers.configuration_utils"), _TalkerTokenIds()
    config_log.addFilter(quiet)
    try:
        yield
    finally:
        config_log.removeFilter(quiet)


def load_processor(folder: str | Path) -> Qwen2_5OmniProcessor:
    with quiet_token_id_checks():  # the tokenizer's loader reads the whole config.json
        return Qwen2_5OmniProcessor.from_pretrained(folder)


def render_prompt(processor: Qwen2_5OmniProcessor, prompt: str) -> str:
    """The chat text for one user turn: the prompt followed by one audio item, as the model card does.

    The checkpoint's chat template adds its default system message ("You are a helpful assistant.").
    Rendered through the tokenizer because the processor's wrapper warns about the talker's system prompt.
    """
    conversation = [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "audio"}]}]
    return processor.tokenizer.apply_chat_template(
        conversation, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resident_parameters(folder: str | Path) -> int:
    """Parameters AudioThinker will hold, read from the checkpoint's safetensors headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            for key in weights.keys():
                if key.startswith("thinker.") and not key.startswith("thinker.visual."):
                    total += math.prod(weights.get_slice(key).get_shape())
    return total
