"""`acecap doctor`: what this machine has, and a tiny model run end to end on the chosen device."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from . import devices
from . import quant as quantization


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cann() -> str:
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return "not found (ASCEND_TOOLKIT_HOME unset; source set_env.sh)"
    info = Path(home) / "version.cfg"
    return f"{home} ({info.read_text().split()[0]})" if info.is_file() else home


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def environment_lines() -> list[str]:
    import torch
    import transformers

    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"torch         {torch.__version__} (cuda {torch.version.cuda or '-'})",
        f"transformers  {transformers.__version__}",
        f"torchvision   {_version('torchvision')}",
        f"torchao       {_version('torchao')} (for --quant)"
        + (": pip install 'acecap[quant]'" if _version("torchao") == "not installed" else ""),
        f"torch_npu     {_version('torch_npu')}",
        f"CANN          {_cann()}",
        f"PYTORCH_NPU_ALLOC_CONF={os.environ.get('PYTORCH_NPU_ALLOC_CONF', '(unset)')}",
    ]
    found = devices.available()
    lines.append(f"cuda devices  {found.cuda}")
    lines.append(f"npu devices   {found.npu}")
    lines.append(f"mps           {'yes' if found.mps else 'no'}")
    for kind, count in (("cuda", found.cuda), ("npu", found.npu if isinstance(found.npu, int) else 0)):
        for index in range(count):
            device = devices.resolve_device(f"{kind}:{index}")
            free, total = devices.memory_info(device)
            lines.append(f"  {device}: {devices.device_name(device)}, {_gib(free)} free of {_gib(total)}")
    cpu_memory = devices.memory_info(devices.resolve_device("cpu"))
    if cpu_memory:
        lines.append(f"cpu memory    {_gib(cpu_memory[0])} free of {_gib(cpu_memory[1])}")
    return lines


def thinker_shapes(shape: str = "7b") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the thinker holds in acecap (default: the released model's shapes), from
    its config, built on the meta device."""
    import torch
    from transformers import Qwen2_5OmniThinkerConfig

    from .model import AudioThinker
    from .tiny import full_config

    with torch.device("meta"):
        thinker = AudioThinker(Qwen2_5OmniThinkerConfig(**full_config(shape)["thinker_config"]))
    return [(name, tuple(tensor.shape)) for name, tensor in thinker.state_dict().items()]


def quant_lines(device, dtype, memory: tuple[int, int] | None) -> list[str]:
    """For each --quant: the ACE-Step thinker's weight bytes on this device, and whether they fit its free memory."""
    import torch

    free = memory[0] if memory else None
    head = f", {_gib(free)} free now" if free is not None else ""
    lines = [f"real model    ACE-Step thinker weights on {device}{head}:"]
    shapes = thinker_shapes()
    rows = [("none", dtype)] + ([("none", torch.bfloat16)] if dtype != torch.bfloat16 else [])
    rows += [(quant, torch.bfloat16) for quant in quantization.QUANTS if quant != "none"]
    for quant, weights_dtype in rows:
        need = quantization.resident_bytes(shapes, quant, weights_dtype, device.type)
        try:
            quantization.check(quant, device, weights_dtype)
            verdict = "" if free is None else ("fits" if need <= free else "does not fit")
        except quantization.QuantError as error:
            verdict = f"cannot run: {error}"
        name = f"{quant} ({devices.dtype_name(weights_dtype)})" if quant == "none" else quant
        lines.append(f"  --quant {name:<11} {_gib(need):>9}  {verdict}".rstrip())
    return lines


def run_doctor(device: str = "auto", dtype: str = "auto") -> int:
    """Print the environment, then caption a 3 s tone with a tiny random model; 0 if it all works."""
    from .captioner import Captioner
    from .generate import Decoding
    from .tiny import write_tiny

    for line in environment_lines():
        print(line)
    print(f"\nrunning a tiny random model on {device} ...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="acecap-doctor-") as folder:
        write_tiny(folder)
        captioner = Captioner.from_pretrained(folder, device=device, dtype=dtype)
        tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(3 * 16000) / 16000).astype(np.float32)
        result = captioner.caption(tone, Decoding(max_new_tokens=16, ignore_eos=True), sample_rate=16000)
    peak = devices.peak_memory(captioner.device)
    print(f"device        {result.device} ({devices.device_name(captioner.device)}), dtype {result.dtype}")
    print(f"tiny model    {result.tokens} tokens, first token {result.timings.first_token_s * 1000:.0f} ms, "
          f"{result.timings.decode_tokens_per_s:.1f} tok/s, peak memory {_gib(peak)}")  # fmt: skip
    for line in quant_lines(captioner.device, captioner.dtype, devices.memory_info(captioner.device)):
        print(line)
    print(f"ok: acecap works on {result.device} ({time.perf_counter() - start:.1f} s)")
    return 0
