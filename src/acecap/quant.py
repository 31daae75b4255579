"""Quantized weights: the language model's linear layers in int8, int4 or fp8, through torchao.

Only the decoder layers' projections (q, k, v, o, gate, up, down) are quantized: they are ~93 % of the
thinker's weights and every one of them is read on every decode step. The audio encoder, the embedding
table and the output head stay in 16-bit. Quantized weights are torchao tensor subclasses, so the
modules keep their types and forward (the decoders call them directly, torch.compile traces them).

A pre-quantized folder (`acecap quantize`) holds the thinker's state in one file of torchao tensors,
loaded with weights_only and mmap, beside the source checkpoint's config, processor and tokenizer files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QUANTS = ("none", "int8", "int4", "fp8")
# The decoder layers' projections, as the checkpoint (thinker.model.layers...), transformers 4.57
# (model.layers...) and transformers >= 5.21 (model.language_model.layers...) name them; the audio
# encoder's layers also have q_proj, under audio_tower.
QUANTIZED_WEIGHT = re.compile(
    r"^(thinker\.)?model\.(language_model\.)?layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)
INT4_GROUPS = (128, 64, 32)  # input features sharing one int4 scale and zero point: the largest that divides
WEIGHTS_FILE = "quantized.pt"
INFO_FILE = "quantization.json"
# Non-weight files of a checkpoint folder that a pre-quantized folder keeps (processor, tokenizer, config).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class QuantError(ValueError):
    """A quantization this machine or checkpoint cannot run, with a message meant for a person."""


def _require_torchao(quant: str) -> None:
    if importlib.util.find_spec("torchao") is None:
        raise QuantError(f"--quant {quant} needs torchao: pip install 'acecap[quant]'")


def check(quant: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before any loading, a quantization this device, dtype or install cannot run."""
    if quant not in QUANTS:
        raise QuantError(f"unknown quantization {quant!r}: use {', '.join(QUANTS)}")
    if quant == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise QuantError(f"--quant {quant} runs on cpu and cuda (torchao's kernels), not {device.type}")
    if dtype != torch.bfloat16:
        raise QuantError(f"--quant {quant} computes in bf16: use --dtype bf16 (or auto)")
    _require_torchao(quant)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if quant == "int4" and major < 8:
            raise QuantError(
                f"--quant int4 needs compute capability 8.0 (Ampere) or newer; {device} has {major}.{minor}"
            )
        if quant == "fp8" and (major, minor) < (8, 9):
            raise QuantError(
                f"--quant fp8 needs FP8 matrix units (compute capability 8.9: Ada, Hopper); {device} has "
                f"{major}.{minor}: use --quant int8"
            )


def int4_group(in_features: int) -> int | None:
    """The int4 group size for a layer with this many input features; None: no group fits, kept in 16-bit."""
    return next((group for group in INT4_GROUPS if in_features % group == 0), None)


def _config(quant: str, device_type: str, in_features: int):
    """The torchao config for one linear layer, or None where it stays in 16-bit."""
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings.
    if quant == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)
    if quant == "int4":
        group = int4_group(in_features)
        if group is None:
            return None
        if device_type == "cuda":  # tinygemm: torch's own int4 kernel for CUDA
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(
                group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
            )
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # torch's CPU int4 kernel

        return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    if quant == "fp8":
        if device_type == "cuda":  # weights and activations in fp8, one scale per row and per token
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        # The CPU has no fp8 matrix units: weights stored in fp8, computed in bf16 (memory, not speed).
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise QuantError(f"unknown quantization {quant!r}: use {', '.join(QUANTS)}")


def quantize_layer(layer: torch.nn.Module, quant: str) -> None:
    """Quantize, in place and on the layer's own device, every linear layer inside `layer`."""
    from torchao.quantization import quantize_

    for module in layer.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.device.type != "meta":
            config = _config(quant, module.weight.device.type, module.in_features)
            if config is not None:
                quantize_(module, config)


def quantize_onto(thinker, device: torch.device, quant: str) -> None:
    """Move a thinker loaded on the CPU to `device`, quantizing its decoder layers one at a time on the way.

    The device never holds more than the quantized layers so far and one 16-bit layer, so a model whose
    16-bit weights do not fit the card can still be loaded onto it quantized.
    """
    from . import compat, devices

    for layer in compat.text_model(thinker).layers:
        layer.to(device)
        quantize_layer(layer, quant)
        devices.release_host_memory()  # the layer's 16-bit weights, on the host
    thinker.to(device)  # the rest: audio encoder, embeddings, norms, output head


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, a torchao tensor's being those of its inner tensors (data, scales, zero points)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they sit in memory."""
    return sum(tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def weight_bytes(name: str, shape: tuple[int, ...], quant: str, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Bytes one checkpoint tensor takes once loaded with `quant` on a device kind (the layouts torchao stores)."""
    count = math.prod(shape)
    if quant == "none" or not QUANTIZED_WEIGHT.match(name):
        return count * dtype.itemsize
    rows, features = shape
    if quant == "int8":
        return count + rows * (4 + 1)  # int8 values; an fp32 scale and an int8 zero point per row
    if quant == "fp8":
        return count + rows * 4  # fp8 values; an fp32 scale per row
    group = int4_group(features)
    if group is None:
        return count * dtype.itemsize
    if device_type == "cuda":  # tinygemm pads input features to a multiple of 1024 and rows to a multiple of 8
        rows, features = -(-rows // 8) * 8, -(-features // 1024) * 1024
    return rows * features // 2 + (features // group) * rows * 2 * dtype.itemsize  # two a byte; scale, zero per group


def resident_bytes(
    shapes: Iterable[tuple[str, tuple[int, ...]]], quant: str, dtype: torch.dtype, device_type: str = "cpu"
) -> int:
    """Bytes of the thinker's weights in `quant` on a device kind, from (name, shape) of each of its tensors."""
    return sum(weight_bytes(name, shape, quant, dtype, device_type) for name, shape in shapes)


def prequantized(folder: str | Path) -> dict | None:
    """What `acecap quantize` recorded in a folder (quant, device_type, dtype, ...), or None for a plain checkpoint."""
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_prequantized(info: dict, folder: str | Path, quant: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a pre-quantized folder on a device kind or dtype it was not made for, or with another --quant."""
    if quant not in ("none", info["quant"]):
        raise QuantError(f"{folder} holds {info['quant']} weights: leave out --quant or give --quant {info['quant']}")
    if device.type != info["device_type"]:
        raise QuantError(
            f"{folder} was quantized for {info['device_type']} (its {info['quant']} weights are packed for that "
            f"kind of device); quantize the original checkpoint again with acecap quantize --device {device.type}"
        )
    if dtype != torch.bfloat16:
        raise QuantError(f"{folder} holds quantized weights that compute in bf16: use --dtype bf16 (or auto)")
    _require_torchao(info["quant"])


def save(state: dict[str, torch.Tensor], source: str | Path, folder: str | Path, info: dict) -> Path:
    """Write a pre-quantized folder: the state (checkpoint names), `info`, and the source's non-weight files."""
    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and not path.name.endswith(".index.json"):
            shutil.copy2(path, folder / path.name)
    partial = folder / (WEIGHTS_FILE + ".partial")
    try:
        torch.save(state, partial)
    except BaseException as error:  # a full disk, Ctrl-C: no half-written file of gigabytes is left behind
        partial.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and isinstance(error.__cause__ or error.__context__, OSError):
            raise error.__cause__ or error.__context__ from None  # torch wraps the OSError: a person's message
        raise
    partial.replace(folder / WEIGHTS_FILE)  # written whole or not at all
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load(folder: str | Path) -> dict[str, torch.Tensor]:
    """A pre-quantized folder's state, memory-mapped on the CPU (weights_only: no code runs from the file)."""
    info = prequantized(folder) or {}
    # weights_only loads only the tensor classes imported so far: import the module of the ones saved here
    # (int4 on the CPU is a prototype module of torchao's that nothing else imports).
    _config(info.get("quant", "none"), info.get("device_type", "cpu"), INT4_GROUPS[0])
    return torch.load(Path(folder) / WEIGHTS_FILE, map_location="cpu", weights_only=True, mmap=True)
