import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from acecap import devices
from acecap.devices import DeviceError, choose_auto, resolve_device, resolve_dtype


def test_auto_prefers_npu_then_cuda_then_mps_then_cpu():
    assert choose_auto(npu=2, cuda=1, mps=1) == "npu:0"
    assert choose_auto(npu=0, cuda=1, mps=1) == "cuda:0"
    assert choose_auto(npu=0, cuda=0, mps=1) == "mps"
    assert choose_auto(npu=0, cuda=0, mps=0) == "cpu"


def test_auto_on_this_machine_is_cpu():
    # No accelerator and no torch_npu here.
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tpu", "unknown device"),
        ("cpu:1", "only cuda and npu take an index"),
        ("cuda:x", "only cuda and npu take an index"),
        ("cuda", "not available"),
        ("npu:0", "torch_npu is not installed"),
    ],
)
def test_unusable_devices_raise_clear_errors(spec, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(spec)


def test_dtype_auto_is_fp32_on_cpu_and_bf16_on_accelerators():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_prefill_packs_prompts_on_accelerators_only():
    assert not devices.packs_prompts(torch.device("cpu"))
    assert devices.packs_prompts(torch.device("cuda", 0))
    assert devices.packs_prompts(torch.device("meta"))  # any device type but the CPU, an NPU's among them


def test_cpu_timing_and_memory_work():
    cpu = torch.device("cpu")
    assert devices.now(cpu) <= devices.now(cpu)
    assert devices.peak_memory(cpu) > 0
    free, total = devices.memory_info(cpu)
    assert 0 < free <= total


BROKEN_NPU = textwrap.dedent(
    """
    raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")
    """
)


def _broken_npu_env(tmp_path, extra: dict | None = None) -> dict:
    """An environment where an installed torch_npu fails to load, as it does without CANN."""
    package = tmp_path / "torch_npu"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(BROKEN_NPU)
    # An entry point like the real wheel's, so that torch >= 2.5 would autoload it on `import torch`.
    info = tmp_path / "torch_npu-2.8.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.8.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    environment.pop("PYTORCH_NPU_ALLOC_CONF", None)
    environment.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)  # set by acecap in this test process
    environment.update(extra or {})
    return environment


def _python(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_broken_cann_breaks_plain_torch_import_but_not_acecap(tmp_path):
    env = _broken_npu_env(tmp_path)
    plain = _python(["-c", "import torch"], env)
    assert plain.returncode != 0 and "libhccl" in plain.stderr  # what users hit without acecap's guard
    guarded = _python(["-c", "import acecap, torch, transformers; print(torch.ones(1).item())"], env)
    assert guarded.returncode == 0, guarded.stderr
    assert guarded.stdout.strip() == "1.0"


def test_broken_cann_gives_one_clear_error_and_sets_the_allocator(tmp_path):
    code = textwrap.dedent(
        """
        import os
        from acecap.devices import DeviceError, resolve_device
        try:
            resolve_device("npu:0")
        except DeviceError as error:
            print("ERROR", error)
        print("ALLOC", os.environ.get("PYTORCH_NPU_ALLOC_CONF"))
        print("AUTO", resolve_device("auto"))
        """
    )
    result = _python(["-c", code], _broken_npu_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ERROR torch_npu is installed but could not be loaded (libhccl.so" in result.stdout
    assert "set_env.sh" in result.stdout
    assert "ALLOC expandable_segments:True" in result.stdout
    assert "AUTO cpu" in result.stdout  # auto falls back, with a warning
    assert "not using the NPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_user_allocator_setting_is_kept(tmp_path):
    code = "import acecap, os; print(os.environ['PYTORCH_NPU_ALLOC_CONF'])"
    result = _python(["-c", code], _broken_npu_env(tmp_path, {"PYTORCH_NPU_ALLOC_CONF": "max_split_size_mb:128"}))
    assert result.stdout.strip() == "max_split_size_mb:128"


@pytest.mark.slow
def test_cli_with_broken_cann_fails_npu_in_one_line_and_still_runs_on_cpu(tmp_path, tiny_model, audio_dir):
    env = _broken_npu_env(tmp_path)
    args = ["-m", "acecap", "caption", str(audio_dir / "tone.wav"), "--model", str(tiny_model), "--max-new-tokens", "2"]
    npu = _python([*args, "--device", "npu:0"], env)
    assert npu.returncode == 2, npu.stderr
    errors = [line for line in npu.stderr.splitlines() if line.startswith("acecap: error:")]
    assert len(errors) == 1 and "libhccl.so" in errors[0] and "Traceback" not in npu.stderr
    cpu = _python([*args, "--device", "cpu"], env)
    assert cpu.returncode == 0, cpu.stderr


def test_weights_that_cannot_fit_are_refused_with_advice():
    cpu = torch.device("cpu")
    devices.check_fits(10 * 2**30, cpu, torch.bfloat16, free=20 * 2**30)
    with pytest.raises(DeviceError, match=r"need 33.0 GiB in fp32 but cpu has 16.0 GiB free; use --dtype bf16"):
        devices.check_fits(int(33 * 2**30), cpu, torch.float32, free=16 * 2**30)
    with pytest.raises(DeviceError, match=r"need 16.5 GiB in bf16 .* free memory or choose another device"):
        devices.check_fits(int(16.5 * 2**30), cpu, torch.bfloat16, free=8 * 2**30)


def test_device_lists_for_several_workers():
    assert devices.expand_devices("all") == ["cpu"]  # no accelerator here: one cpu worker
    assert devices.expand_devices("npu:0, npu:1,") == ["npu:0", "npu:1"]
    assert devices.expand_devices("cpu,cpu") == ["cpu", "cpu"]


def test_out_of_memory_is_recognised_from_each_backend():
    with pytest.raises(RuntimeError) as failure:
        torch.empty(2**60, dtype=torch.uint8)  # a real allocation failure of the CPU allocator
    assert devices.is_out_of_memory(failure.value)
    assert devices.is_out_of_memory(RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(ValueError) as wrapped:  # how transformers reports numpy's MemoryError
        try:
            np.empty(2**60, dtype=np.uint8)
        except MemoryError as error:
            raise ValueError("Unable to convert output 'input_features' to tensor") from error
    assert devices.is_out_of_memory(wrapped.value)
    assert not devices.is_out_of_memory(ValueError("bad input"))
