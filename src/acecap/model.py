"""The lean model: the thinker alone (audio encoder + LLM), its processor, tasks and prompts."""

from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

from . import compat
from . import quant as quantization
from .writers import check_writable


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
    with quiet_config_checks():
        return Qwen2_5OmniThinkerConfig.from_pretrained(folder)


def load_thinker(folder: str | Path, device: torch.device, dtype: torch.dtype, quant: str = "none") -> AudioThinker:
    """Load the thinker's weights onto `device`, quantized as `quant` says; fail loudly if any are missing.

    Unquantized weights load straight onto the device. Quantized ones are read into CPU memory, then
    each decoder layer moves to the device and is quantized there, one at a time, so the device never
    holds the 16-bit model. A folder written by `acecap quantize` loads its quantized weights as they are.
    """
    if quantization.prequantized(folder):
        return _load_prequantized(folder, device, dtype)
    model = _from_checkpoint(folder, device if quant == "none" else torch.device("cpu"), dtype)
    if quant != "none":
        quantization.quantize_onto(model, device, quant)
    return model


def _from_checkpoint(folder: str | Path, device: torch.device, dtype: torch.dtype) -> AudioThinker:
    with quiet_config_checks():  # from_pretrained reads config.json again
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


class _ReleasedConfigNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "must be `None` or an integer within the vocabulary" not in message and "mrope_section" not in message


@contextmanager
def quiet_config_checks():
    """Silence transformers' checks that misread the released configs; acecap never loads the talker.

    5.x checks every sub-config's token ids against a vocabulary, and the full checkpoint's configs name the
    thinker's audio and talker ids (151647 and up) beside the talker's 8,448-token vocabulary: seven warnings.
    4.57 validates `rope_scaling` as the default type and calls the multimodal `mrope_section` unrecognized.
    """
    quiet = _ReleasedConfigNoise()
    loggers = [logging.getLogger(f"transformers.{name}") for name in ("configuration_utils", "modeling_rope_utils")]
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


def official_key(name: str) -> str:
    """State-dict names as the released checkpoint spells them (transformers >= 5.21 nests the thinker)."""
    name = re.sub(r"^thinker\.model\.(audio_tower|visual)\.", r"thinker.\1.", name)
    return re.sub(r"^thinker\.model\.language_model\.", "thinker.model.", name)


def _load_prequantized(folder: str | Path, device: torch.device, dtype: torch.dtype) -> AudioThinker:
    """A folder written by `acecap quantize`: the thinker built without weights, then given the saved ones."""
    from accelerate import init_empty_weights

    config = thinker_config(folder)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # buffers (rotary frequencies aside) as from_pretrained makes them
    try:
        with init_empty_weights():  # parameters on the meta device; buffers real
            thinker = AudioThinker(config)
    finally:
        torch.set_default_dtype(default)
    state = quantization.load(folder)
    names = {name: official_key(f"thinker.{name}") for name in thinker.state_dict()}
    missing = sorted(saved for saved in names.values() if saved not in state)
    if missing:
        raise CheckpointError(f"{folder}: {quantization.WEIGHTS_FILE} lacks {len(missing)} weights, like {missing[0]}")
    thinker.load_state_dict({name: state[saved] for name, saved in names.items()}, assign=True)
    return thinker.to(device).eval()


def write_quantized(source: str | Path, folder: str | Path, quant: str, device: torch.device) -> Path:
    """`acecap quantize`: load a checkpoint quantized onto `device` and write it as a folder that loads as it is.

    int4's packing is the device kind's own (CUDA's tinygemm tiles, the CPU's), so the folder is for that kind.
    """
    from importlib.metadata import version

    if quantization.prequantized(source):
        raise quantization.QuantError(f"{source} is already quantized: quantize the original checkpoint")
    if quant == "none":
        raise quantization.QuantError("acecap quantize needs --quant int8, int4 or fp8")
    if Path(folder).resolve() == Path(source).resolve():
        raise quantization.QuantError("write the quantized folder beside the checkpoint, not over it")
    quantization.check(quant, device, torch.bfloat16)
    check_writable(Path(folder))  # before minutes of loading, not after
    thinker = load_thinker(source, device, torch.bfloat16, quant)
    info = {"quant": quant, "device_type": device.type, "dtype": "bf16", "torchao": version("torchao"),
            "source": str(source)}  # fmt: skip
    return save_prequantized(thinker, source, folder, info)


def save_prequantized(thinker: AudioThinker, source: str | Path, folder: str | Path, info: dict) -> Path:
    """Write a loaded (quantized) thinker as a pre-quantized folder, under the checkpoint's own names."""
    state = {official_key(f"thinker.{name}"): tensor for name, tensor in thinker.state_dict().items()}
    return quantization.save(state, source, folder, info)


def load_processor(folder: str | Path) -> Qwen2_5OmniProcessor:
    with quiet_config_checks():  # the tokenizer's loader reads the whole config.json
        # 4.57 warns that its default image processor changed unless told (acecap never reads images); 5.x
        # deprecates the option
        options = {"use_fast": True} if compat.VERSION.major < 5 else {}
        return Qwen2_5OmniProcessor.from_pretrained(folder, **options)


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


VISION = re.compile(r"(^|\.)visual\.")


def checkpoint_shapes(folder: str | Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each tensor AudioThinker holds, read from the checkpoint's safetensors headers.

    A full checkpoint's thinker.* tensors, or all of a thinker-only checkpoint's; never the vision tower's.
    No weights are read.
    """
    from safetensors import safe_open

    shapes = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as weights:
            for key in weights.keys():
                shapes.append((key, tuple(weights.get_slice(key).get_shape())))
    if any(name.startswith("thinker.") for name, _ in shapes):
        shapes = [(name, shape) for name, shape in shapes if name.startswith("thinker.")]
    return [(name, shape) for name, shape in shapes if not VISION.search(name)]


def resident_parameters(folder: str | Path) -> int:
    """Parameters AudioThinker will hold, read from the checkpoint's safetensors headers (no weights read)."""
    return sum(math.prod(shape) for _, shape in checkpoint_shapes(folder))


def resident_bytes(folder: str | Path, quant: str, dtype: torch.dtype, device_type: str) -> int:
    """Bytes the thinker's weights take on a device kind once loaded from `folder` with `quant`."""
    if quantization.prequantized(folder):
        return (Path(folder) / quantization.WEIGHTS_FILE).stat().st_size
    return quantization.resident_bytes(checkpoint_shapes(folder), quant, dtype, device_type)
