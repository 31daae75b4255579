"""annotate's inputs as a user gives them: checked before any model loads, and recorded under their root."""

from __future__ import annotations

import numpy as np
import soundfile
from conftest import run_acecap


def annotate_cli(tiny_model, *args: str):
    return run_acecap("annotate", *args, "--model", str(tiny_model), "--max-new-tokens", "3")


def test_a_missing_input_fails_at_once_without_loading_the_model(tiny_model, tmp_path):
    soundfile.write(tmp_path / "song.wav", np.zeros(16000, np.float32), 16000)
    result = annotate_cli(tiny_model, str(tmp_path / "song.wav"), str(tmp_path / "nosuchdir"), "-o",
                          str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"acecap: error: {tmp_path / 'nosuchdir'}: no such file or folder"]
    assert not (tmp_path / "out").exists(), "nothing is written for a mistyped input"
    (tmp_path / "link.wav").symlink_to(tmp_path / "gone.wav")
    result = annotate_cli(tiny_model, str(tmp_path / "link.wav"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "which does not exist" in result.stderr and "model on" not in result.stderr


def test_an_empty_folder_or_manifest_says_so_and_fails(tiny_model, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("no audio here\n")
    (tmp_path / "list.txt").write_text("# nothing listed yet\n")
    result = annotate_cli(tiny_model, str(tmp_path / "empty"), str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{tmp_path / 'empty'}: no audio files in it (looked for " in line and "wav" in line
    assert f"{tmp_path / 'list.txt'}: lists no files" in line


def test_a_shard_with_no_share_of_the_files_is_not_an_error(tiny_model, tmp_path):
    soundfile.write(tmp_path / "song.wav", np.zeros(16000, np.float32), 16000)
    results = [annotate_cli(tiny_model, str(tmp_path), "-o", str(tmp_path / f"out{i}"), "--shard", f"{i}/2", "--quiet")
               for i in range(2)]  # fmt: skip
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert sorted("files          1 " in r.stderr for r in results) == [False, True]
