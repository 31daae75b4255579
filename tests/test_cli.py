import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_acecap

PROMPT_TEXT = ("Describe this audio", "You are a helpful assistant", "system", "assistant")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tone.wav", "tone.flac", "tone.mp3", "tone.ogg", "stereo24.wav"])
def test_caption_prints_only_the_generated_text(tiny_model, audio_dir, name):
    result = run_acecap("caption", str(audio_dir / name), "--model", str(tiny_model), "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert not any(text in result.stdout for text in PROMPT_TEXT)
    assert f"{audio_dir / name}: 3.0 s audio, 6 tokens" in result.stderr


@pytest.mark.slow
def test_output_files_in_each_format(tiny_model, audio_dir, tmp_path):
    files = [str(audio_dir / "tone.wav"), str(audio_dir / "tone.m4a")]
    for fmt in ("txt", "json"):
        args = ["caption", *files, "--model", str(tiny_model), "--max-new-tokens", "4", "-o", str(tmp_path), "-f", fmt]
        result = run_acecap(*args)
        assert result.returncode == 2, result.stderr  # tone.wav and tone.m4a share the name "tone"
        assert "would write the same output files" in result.stderr
    one_file = ["caption", *files, "--model", str(tiny_model), "--max-new-tokens", "4", "-o", str(tmp_path / "jsonl")]
    result = run_acecap(*one_file, "-f", "jsonl")  # one line per file in one file: nothing can clash
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "jsonl" / "caption.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == files
    files = [str(audio_dir / "tone.wav"), str(audio_dir / "stereo24.wav")]
    for fmt in ("txt", "json", "jsonl"):
        args = ["caption", *files, "--model", str(tiny_model), "--max-new-tokens", "4", "-o", str(tmp_path), "-f", fmt]
        result = run_acecap(*args)
        assert result.returncode == 0, result.stderr
    captions = result.stdout.split("# ")[1:]
    assert len(captions) == 2
    assert (tmp_path / "tone.caption.txt").read_text().strip() == captions[0].split("\n", 1)[1].strip()
    record = json.loads((tmp_path / "stereo24.caption.json").read_text())
    assert record["tokens"] == 4 and record["dtype"] == "fp32" and record["truncated"] is False
    lines = (tmp_path / "caption.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == files


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, says",
    [
        (["-f", "json"], "-f json says what -o DIR receives"),
        (["--max-duration", "0"], "--max-duration 0: give a length"),
        (["--max-duration", "nan"], "'nan': give a finite number"),
        (["--temperature", "nan"], "'nan': give a finite number"),
        (["--repetition-penalty", "inf"], "'inf': give a finite number"),
    ],
)
def test_caption_options_that_cannot_work_are_usage_errors_before_loading(tiny_model, audio_dir, options, says):
    result = run_acecap("caption", str(audio_dir / "tone.wav"), "--model", str(tiny_model), *options)
    assert result.returncode == 2 and says in result.stderr and "loaded in" not in result.stderr, result.stderr


def one_error_line(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("acecap: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.slow
def test_hub_id_while_offline(audio_dir, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MODELSCOPE_CACHE": str(tmp_path / "ms")}
    error = one_error_line(run_acecap("caption", str(audio_dir / "tone.wav"), env=env))
    assert "ACE-Step/acestep-captioner" in error and "--model" in error


@pytest.mark.slow
def test_missing_file(tiny_model, audio_dir):
    error = one_error_line(run_acecap("caption", str(audio_dir / "nope.wav"), "--model", str(tiny_model)))
    assert "nope.wav: no such file" in error


@pytest.mark.slow
def test_non_audio_file(tiny_model, audio_dir):
    error = one_error_line(run_acecap("caption", str(audio_dir / "notes.txt"), "--model", str(tiny_model)))
    assert "notes.txt: not an audio file" in error


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "npu:0", "mps", "tpu"])
def test_unavailable_device(tiny_model, audio_dir, device):
    result = run_acecap("caption", str(audio_dir / "tone.wav"), "--model", str(tiny_model), "--device", device)
    assert "device" in one_error_line(result) or "npu" in one_error_line(result)


@pytest.mark.slow
def test_a_bad_file_does_not_stop_the_others(tiny_model, audio_dir):
    files = [str(audio_dir / "notes.txt"), str(audio_dir / "tone.wav"), str(audio_dir / "empty.wav")]
    result = run_acecap("caption", *files, "--model", str(tiny_model), "--max-new-tokens", "3")
    assert result.returncode == 1
    assert f"# {audio_dir / 'tone.wav'}" in result.stdout
    assert "notes.txt: not an audio file" in result.stderr and "empty.wav: empty file" in result.stderr


@pytest.mark.slow
def test_lyrics_task_uses_the_transcription_prompt(tiny_model, audio_dir, tmp_path):
    args = ["caption", str(audio_dir / "tone.wav"), "--task", "lyrics", "--model", str(tiny_model)]
    result = run_acecap(*args, "--max-new-tokens", "3", "-o", str(tmp_path), "-f", "json")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "tone.lyrics.json").read_text())
    assert record["prompt"] == "*Task* Transcribe this audio in detail" and record["task"] == "lyrics"


@pytest.mark.slow
def test_doctor_runs_the_tiny_model_end_to_end():
    result = run_acecap("doctor", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for expected in ("python", "torch", "transformers", "torch_npu", "CANN", "ok: acecap works on cpu"):
        assert expected in result.stdout
    assert "16 tokens" in result.stdout


def test_help_teaches():
    result = run_acecap("caption", "--help")
    assert result.returncode == 0
    for flag in ("--model", "--hub", "--device", "--dtype", "--max-new-tokens", "--max-duration", "--prompt", "-f"):
        assert flag in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--decode-workers", "--prefill-tokens"])
def test_annotate_refuses_a_pipeline_without_room_before_loading(tiny_model, tmp_path, flag):
    result = run_acecap("annotate", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(tiny_model), flag, "0")
    assert f"{flag} must be at least 1" in one_error_line(result)


def test_the_prefill_budget_default_is_the_decoders():
    from acecap.cli import PREFILL_TOKENS
    from acecap.decode import PREFILL_TOKENS as decoder_default

    assert PREFILL_TOKENS == decoder_default


def test_the_command_line_answers_without_loading_torch():
    """--version, --help and usage errors must not wait for torch and transformers (seconds to import)."""
    probe = (
        "import sys, contextlib, io\n"
        "from acecap.cli import main\n"
        "for argv in (['--version'], ['annotate', '--help'], ['annotate']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_api_loads_on_first_use():
    probe = "import sys, acecap; assert 'torch' not in sys.modules; print(acecap.Decoding().max_new_tokens)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "512"


@pytest.mark.slow
def test_quiet_runs_print_no_library_noise(tiny_model, audio_dir, tmp_path):
    """No weight-loading bar under --quiet or in caption, and no config warnings about the unused talker."""
    annotate = run_acecap("annotate", str(audio_dir / "tone.wav"), "-o", str(tmp_path / "out"), "--model",
                          str(tiny_model), "--max-new-tokens", "3", "--quiet")  # fmt: skip
    caption = run_acecap("caption", str(audio_dir / "tone.wav"), "--model", str(tiny_model), "--max-new-tokens", "3")
    several = run_acecap("annotate", str(audio_dir / "tone.wav"), "-o", str(tmp_path / "two"), "--model",
                         str(tiny_model), "--max-new-tokens", "3", "--devices", "cpu,cpu", "--quiet")  # fmt: skip
    for result in (annotate, caption, several):  # several: the spawned worker processes too
        assert result.returncode == 0, result.stderr
        assert "Loading weights" not in result.stderr and "Model config" not in result.stderr
    writer = subprocess.run([sys.executable, "-m", "acecap.tiny", str(tmp_path / "tiny")], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert writer.returncode == 0 and writer.stderr == "" and writer.stdout.strip() == str(tmp_path / "tiny")


@pytest.mark.parametrize(
    ("shard", "says"),
    [("4/4", "numbered from 0, so the last of 4 is 3/4"), ("1-4", "use i/N"), ("2/0", "use i/N")],
)
@pytest.mark.slow
def test_a_shard_out_of_range_says_how_shards_count(tmp_path, shard, says):
    result = run_acecap("annotate", str(tmp_path), "-o", str(tmp_path / "out"), "--shard", shard)
    assert says in one_error_line(result)
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--model", "/no/such/folder"], "model folder /no/such/folder does not exist"),
        (["--model", "captoin=/no/such/folder"], "'captoin' is not a task; use caption=MODEL or lyrics=MODEL"),
        (["--decoder", "graphs", "--device", "cpu"], "--decoder graphs needs a CUDA device, not cpu"),
        (["--sidecars-in", "/tmp/sidecars"], "--sidecars-in says where -f acestep writes its sidecars"),
    ],
)
@pytest.mark.slow
def test_annotate_refuses_a_model_or_decoder_it_cannot_run_before_any_work(
    tiny_model, audio_dir, tmp_path, options, says
):
    options = options if "--model" in options else ["--model", str(tiny_model), *options]
    result = run_acecap("annotate", str(audio_dir / "tone.wav"), "-o", str(tmp_path / "out"), *options)
    assert says in one_error_line(result) and result.returncode == 2
    assert not (tmp_path / "out").exists()  # nothing made: a usage error, not a run that failed


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_load_ends_in_one_line(tiny_model, audio_dir, tmp_path):
    command = [sys.executable, "-m", "acecap", "annotate", str(audio_dir / "tone.wav"), "-o", str(tmp_path / "out"),
               "--model", str(tiny_model), "--quiet"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # torch and transformers are still importing
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert "Traceback" not in stderr and stderr.strip().endswith("acecap: error: interrupted"), stderr
    assert process.returncode in (130, -signal.SIGINT)


def test_the_tiny_model_refuses_a_file_for_its_folder(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "acecap.tiny", str(tmp_path / "taken")], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 2 and "is a file: give a folder" in result.stderr and "Traceback" not in result.stderr
