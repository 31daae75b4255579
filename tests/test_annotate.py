import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import encode_with_pyav, run_acecap

from acecap import Decoding
from acecap.annotate import Job, annotate
from acecap.inputs import Item, ManifestError, discover, in_shard
from acecap.progress import summary_table
from acecap.records import ANNOTATIONS, load_records


def write_tones(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Clips of different lengths (0.6–3.5 s) and pitches, some in sub-folders."""
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        seconds = rng.uniform(0.6, 3.5)
        t = np.arange(int(seconds * 16000)) / 16000
        samples = 0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t)
        path = folder / (f"part{index % 3}" if index % 2 else "") / f"clip{index:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, samples, 16000)
        paths.append(path)
    return paths


def records_of(folder: Path) -> list[dict]:
    """The merged records, each path absolute (on disk they are under their root: see test_inputs)."""
    assert not list(folder.glob("annotations.part-*"))
    return load_records(folder)


def texts(records: list[dict]) -> dict[str, str]:
    return {r["path"]: r["caption"] for r in records}


def job(tiny_model, inputs, output, **options) -> Job:
    defaults = {"decoding": Decoding(max_new_tokens=6), "devices": ["cpu"]}
    return Job(inputs=[str(i) for i in inputs], output_dir=output, model=str(tiny_model), **{**defaults, **options})


def test_batched_run_equals_one_by_one(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 9)
    batched = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "b8", batch_size=8), progress=False)
    single = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "b1", batch_size=1), progress=False)
    assert batched.ok and single.ok and batched.captioned == 9
    assert texts(records_of(tmp_path / "b8")) == texts(records_of(tmp_path / "b1"))


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Eleven kinds of unusable input, each with (part of) the reason acecap must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.mp3").write_text("these are lyrics, not audio\n" * 20)
    (folder / "noise.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    good = folder / "whole.wav"
    soundfile.write(good, np.zeros(16000, dtype=np.float32), 16000)
    (folder / "cut-header.wav").write_bytes(good.read_bytes()[:30])
    good.unlink()
    soundfile.write(folder / "no-frames.wav", np.zeros(0, dtype=np.float32), 16000)
    soundfile.write(folder / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    soundfile.write(folder / "inf.wav", np.full(16000, np.inf, dtype=np.float32), 16000, subtype="FLOAT")
    (folder / "dangling.wav").symlink_to(folder / "gone.wav")
    (folder / "image.m4a").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return {
        "empty.wav": "empty file",
        "text.mp3": "not an audio file",
        "noise.flac": "corrupt",
        "cut-header.wav": "",
        "no-frames.wav": "no audio samples",
        "nan.wav": "NaN or infinite",
        "inf.wav": "NaN or infinite",
        "folder.ogg": "folder",  # listed in the manifest
        "dangling.wav": "no such file",
        "image.m4a": "no audio stream",
        "listed-but-missing.wav": "no such file",
    }


@pytest.mark.slow
def test_bad_inputs_get_clear_errors_and_the_rest_finishes(tiny_model, tmp_path):
    good = write_tones(tmp_path / "in", 4)
    expected = make_bad_inputs(tmp_path / "in" / "bad")
    soundfile.write(tmp_path / "in" / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    manifest = tmp_path / "extra.txt"
    (tmp_path / "folder.ogg").mkdir()
    manifest.write_text("in/bad/listed-but-missing.wav\nfolder.ogg\n")
    result = run_acecap(
        "annotate", str(tmp_path / "in"), str(manifest), "-o", str(tmp_path / "out"),
        "--model", str(tiny_model), "--max-new-tokens", "4", "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    by_name = {Path(r["path"]).name: r for r in records_of(tmp_path / "out")}
    assert len(by_name) == len(good) + len(expected) + 1
    for name, reason in expected.items():
        assert by_name[name]["error"], name
        assert reason in by_name[name]["error"], (name, by_name[name]["error"])
        assert f"FAILED {by_name[name]['path']}: " in result.stderr
    for path in good:
        assert by_name[path.name]["error"] is None and by_name[path.name]["caption"]
    silent = by_name["silence.wav"]
    assert silent["error"] is None and silent["silent"] is True and silent["caption"]
    assert f"failed         {len(expected)}" in result.stderr


@pytest.mark.slow
def test_resume_skips_finished_files_and_redoes_changed_ones(tiny_model, tmp_path):
    paths = write_tones(tmp_path / "in", 5)
    first = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    assert first.captioned == 5 and first.skipped == 0
    soundfile.write(paths[0], np.zeros(8000, dtype=np.float32) + 0.1, 16000)  # new content
    second = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    assert second.skipped == 4 and second.captioned == 1
    records = records_of(tmp_path / "out")
    assert len(records) == 5 and len({r["path"] for r in records}) == 5
    changed = next(r for r in records if r["path"] == str(paths[0].resolve()))
    assert changed["duration"] == 0.5
    other_prompt = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out", prompt="*Task* Name it"), False)
    assert other_prompt.skipped == 0 and other_prompt.captioned == 5
    again = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out", overwrite=True), progress=False)
    assert again.skipped == 0 and again.captioned == 5 and len(records_of(tmp_path / "out")) == 5


@pytest.mark.slow
def test_kill_at_any_moment_loses_nothing_done(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 40, seed=1)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "acecap", "annotate", str(tmp_path / "in"), "-o", str(output),
        "--model", str(tiny_model), "--max-new-tokens", "4", "--batch-size", "4", "--quiet",
    ]  # fmt: skip
    rng = random.Random(7)
    for _ in range(4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 9.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        for record in load_records(output):  # whatever is on disk is whole and valid
            assert record["error"] is None and record["caption"] is not None
    final = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    records = records_of(output)
    assert sorted(Path(r["path"]).name for r in records) == [f"clip{i:02d}.wav" for i in range(40)]
    assert all(r["error"] is None and r["caption"] for r in records)
    assert not list(output.glob("annotations.part-*"))


def test_a_torn_last_line_is_cut_off_and_redone(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 3)
    annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    path = tmp_path / "out" / ANNOTATIONS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # as if killed mid-write
    summary = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    assert summary.skipped == 2 and summary.captioned == 1 and len(records_of(tmp_path / "out")) == 3


def test_a_txt_that_cannot_be_restored_fails_its_file_instead_of_passing(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 4)  # clip01 and clip03 are in sub-folders
    assert annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False).ok
    (tmp_path / "out" / "part1").write_text("a file where -f txt needs a folder")
    summary = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out", write_txt=True), progress=False)
    assert not summary.ok and [Path(path).name for path, _ in summary.failures] == ["clip01.wav"]
    assert "cannot write its .caption.txt" in summary.failures[0][1]
    assert (tmp_path / "out" / "clip00.caption.txt").is_file() and summary.skipped == 3


def test_records_that_cannot_be_merged_stay_in_their_part_files_and_the_run_says_so(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 3)
    (tmp_path / "out" / ANNOTATIONS).mkdir(parents=True)  # in the way of the merged file, as a full disk would be
    summary = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    assert summary.captioned == 3 and not summary.ok and summary.unmerged
    assert "the records are safe in the annotations.part-*.jsonl files" in summary_table(summary)
    assert len(load_records(tmp_path / "out")) == 3  # read from the part files
    (tmp_path / "out" / ANNOTATIONS).rmdir()
    again = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out"), progress=False)
    assert again.ok and again.skipped == 3 and len(records_of(tmp_path / "out")) == 3


@pytest.mark.slow
def test_two_cpu_workers_give_the_same_records_as_one(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 12, seed=3)
    one = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "one", batch_size=4), progress=False)
    two = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "two", batch_size=4, devices=["cpu", "cpu"]), False)
    assert one.ok and two.ok and two.captioned == 12
    assert texts(records_of(tmp_path / "one")) == texts(records_of(tmp_path / "two"))
    assert set(two.per_device) == {0, 1}


def test_manifests_list_files(tmp_path):
    paths = write_tones(tmp_path / "data", 3)
    (tmp_path / "list.txt").write_text("\n".join(str(p.relative_to(tmp_path)) for p in paths) + "\n")
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Path", "genre"])
        writer.writerows([[str(p), "pop"] for p in paths])
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"audio_path": str(p)}) + "\n" for p in paths))
    (tmp_path / "LIST.CSV").write_bytes((tmp_path / "list.csv").read_bytes())  # upper case, as Windows tools write
    for manifest in ("list.txt", "list.csv", "list.jsonl", "LIST.CSV"):
        found = discover([tmp_path / manifest])
        assert [item.path.resolve() for item in found] == [p.resolve() for p in paths], manifest


def test_a_manifest_names_files_that_are_not_utf8_and_refuses_an_entry_without_a_path(tmp_path):
    (tmp_path / "ok.wav").write_bytes(b"")
    odd = os.fsdecode(b"caf\xe9.wav")  # a Latin-1 name, as `find > list.txt` writes it
    (tmp_path / odd).write_bytes(b"")
    (tmp_path / "list.txt").write_bytes(b"ok.wav\ncaf\xe9.wav\n")
    assert [item.path.name for item in discover([tmp_path / "list.txt"])] == ["ok.wav", odd]
    (tmp_path / "list.jsonl").write_bytes(b'{"path": "ok.wav"}\n{"path": null}\n')
    with pytest.raises(ManifestError, match=r"list.jsonl:2: its path is null"):
        discover([tmp_path / "list.jsonl"])


def test_symlinked_folders_are_followed_once_and_cannot_loop(tmp_path):
    write_tones(tmp_path / "real", 2)
    (tmp_path / "top").mkdir()
    write_tones(tmp_path / "top", 1)
    (tmp_path / "top" / "album").symlink_to(tmp_path / "real")  # an album linked into the collection
    (tmp_path / "top" / "again").symlink_to(tmp_path / "real")  # the same album twice: its files once
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "top")  # a link back up the tree
    found = [item.relative.as_posix() for item in discover([tmp_path / "top"])]
    assert len(found) == 3 and sorted(Path(name).name for name in found) == ["clip00.wav", "clip00.wav", "clip01.wav"]
    assert found == [item.relative.as_posix() for item in discover([tmp_path / "top"])]  # the same paths every run


def test_shards_partition_the_files(tmp_path):
    items = [Item(tmp_path / f"song{i}.wav", Path(f"song{i}.wav")) for i in range(50)]
    shares = [[item for item in items if in_shard(item, (index, 4))] for index in range(4)]
    assert sorted(item.path for share in shares for item in share) == sorted(item.path for item in items)
    assert all(share for share in shares)


def test_a_dataset_mounted_at_different_places_is_split_the_same_way(tmp_path):
    for mount in ("a/mnt/nas/songs", "b/data/songs"):  # one dataset as two machines see it
        write_tones(tmp_path / mount, 24, seed=2)
    shares = [{item.relative for item in discover([tmp_path / mount]) if in_shard(item, (0, 2))}
              for mount in ("a/mnt/nas/songs", "b/data/songs")]  # fmt: skip
    assert shares[0] == shares[1] and 0 < len(shares[0]) < 24


@pytest.mark.slow
def test_shards_running_at_once_into_one_folder_keep_each_others_records(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 16, seed=5)
    command = [sys.executable, "-m", "acecap", "annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
               "--model", str(tiny_model), "--max-new-tokens", "4", "--batch-size", "2", "--quiet"]  # fmt: skip
    shards = [subprocess.Popen(command + ["--shard", f"{index}/3"], stderr=subprocess.PIPE, text=True)
              for index in range(3)]  # fmt: skip
    for shard in shards:
        assert shard.wait(timeout=600) == 0, shard.stderr.read()
    records = records_of(tmp_path / "out")  # whichever shard merged last, every shard's records are in
    assert sorted(Path(r["path"]).name for r in records) == [f"clip{i:02d}.wav" for i in range(16)]


def test_segment_mode_captions_each_window(tiny_model, tmp_path, caplog):
    (tmp_path / "in").mkdir()
    soundfile.write(tmp_path / "in" / "song.wav", np.random.default_rng(0).standard_normal(16000 * 5) * 0.1, 16000)
    caplog.set_level(logging.WARNING, logger="acecap")
    windows = job(tiny_model, [tmp_path / "in"], tmp_path / "out", long_audio="segment", segment_seconds=2,
                  max_duration=1.5, write_txt=True)  # fmt: skip
    summary = annotate(windows, progress=False)
    assert summary.ok and "captioning the first" not in caplog.text  # --max-duration is truncate's: windows whole
    (record,) = records_of(tmp_path / "out")
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]
    assert all(s["text"] and s["finished"] is False for s in record["segments"]) and not record["truncated"]
    # One description of the song, as ACE-Step takes it: the first window's; every window's is in segments.
    assert record["caption"] == record["segments"][0]["text"] and record["finished"] is False
    assert (tmp_path / "out" / "song.caption.txt").read_text() == record["caption"] + "\n"
    assert record["tokens"] == sum(s["tokens"] for s in record["segments"])
    # A tail too short for the encoder (10 ms) joins the window before it rather than be captioned as nothing.
    soundfile.write(tmp_path / "in" / "song.wav", np.random.default_rng(0).standard_normal(64160) * 0.1, 16000)
    assert annotate(windows, progress=False).ok
    (record,) = records_of(tmp_path / "out")
    assert [(s["start"], s["end"]) for s in record["segments"]] == [(0.0, 2.0), (2.0, 4.01)]


def test_segment_windows_longer_than_the_model_takes_are_refused(tiny_model, tmp_path, caplog):
    write_tones(tmp_path / "in", 1)
    summary = annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out", long_audio="segment",
                           segment_seconds=1e5), progress=False)  # fmt: skip
    assert not summary.ok and summary.not_processed == 1 and not records_of(tmp_path / "out")
    assert "--segment-seconds 100000: this model takes at most" in caplog.text


def test_truncate_flags_and_txt_files_mirror_the_input_tree(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 4)
    summary = annotate(
        job(tiny_model, [tmp_path / "in"], tmp_path / "out", max_duration=1.0, write_txt=True), progress=False
    )
    assert summary.ok
    records = records_of(tmp_path / "out")
    assert all(r["truncated"] == (r["duration"] > 1.0) for r in records)
    for record in records:
        relative = Path(record["path"]).relative_to((tmp_path / "in").resolve()).with_suffix(".caption.txt")
        assert (tmp_path / "out" / relative).read_text().strip() == record["caption"]


def test_files_cut_at_max_duration_are_redone_by_a_run_that_would_caption_more(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 4, seed=4)  # 0.6-3.5 s each
    run = lambda **options: annotate(job(tiny_model, [tmp_path / "in"], tmp_path / "out", **options), False)  # noqa: E731
    first = run(max_duration=1.0)
    cut = sum(r["truncated"] for r in records_of(tmp_path / "out"))
    assert first.ok and 0 < cut < 4
    assert run(max_duration=1.0).skipped == 4  # the same settings: nothing to gain
    assert run(max_duration=2.0).captioned == cut  # more of each cut file is read now
    longer = sum(r["truncated"] for r in records_of(tmp_path / "out"))
    assert run(long_audio="full").captioned == longer and run(long_audio="full").skipped == 4
    assert not any(r["truncated"] for r in records_of(tmp_path / "out"))
    assert run().skipped == 4  # a default run reads less than full did: it redoes nothing


def test_which_runs_redo_a_file_cut_short():
    from acecap.annotate import _cut_earlier

    def redo(before: str, now: str, max_before: float = 300.0, max_now: float = 300.0) -> bool:
        record = {"truncated": True, "long_audio": before, "max_duration": max_before}
        return _cut_earlier(record, Job(inputs=[], output_dir=Path("."), long_audio=now, max_duration=max_now))

    assert redo("truncate", "full") and redo("truncate", "segment") and redo("full", "segment")
    assert redo("truncate", "truncate", max_now=600.0) and not redo("truncate", "truncate")
    assert not redo("full", "truncate") and not redo("segment", "truncate") and not redo("segment", "full")
    assert not redo("full", "full") and not redo("segment", "segment")


def test_other_formats_decode_in_annotate(tiny_model, tmp_path, audio_dir):
    encode_with_pyav(tmp_path / "song.m4a", np.zeros(16000, dtype=np.float32) + 0.01, 16000, "aac")
    summary = annotate(job(tiny_model, [tmp_path / "song.m4a", audio_dir / "tone.opus"], tmp_path / "out"), False)
    assert summary.ok and summary.captioned == 2


@pytest.mark.slow
def test_cli_annotate_reports_and_exits_zero_when_all_is_well(tiny_model, tmp_path):
    write_tones(tmp_path / "in", 3)
    result = run_acecap("annotate", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--max-new-tokens", "3", "-f", "txt")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "captioned      3" in result.stderr and "files/min" in result.stderr


OUT_OF_MEMORY_RUN = """
import json, resource, sys
import numpy as np
from acecap import Captioner, Decoding
from acecap.batching import caption_splitting
from acecap.audio import to_clip

def vm(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024

# One prefill pass for the whole batch, so that the batch's memory grows with its clips.
captioner = Captioner.from_pretrained(sys.argv[1], device="cpu", prefill_tokens=10**6)
clips = [to_clip(np.random.default_rng(i).standard_normal(16000 * 300).astype(np.float32) * 0.1, 16000, str(i))
         for i in range(16)]
decoding = Decoding(max_new_tokens=3)
alone = [captioner.caption_clips([clip], decoding)[0].text for clip in clips]
one = vm("VmPeak") - vm("VmSize")  # the most one clip took above what stays mapped
before = vm("VmSize")
captioner.caption_clips(clips, decoding)
sixteen = vm("VmPeak") - before
# Half of what the batch of sixteen took: it fails, and after splitting the clips fit.
resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + sixteen // 2, resource.RLIM_INFINITY))
results = caption_splitting(captioner, clips, decoding, 300.0)
print(json.dumps({"alone": alone, "split": [r if isinstance(r, str) else r.text for r in results],
                  "one": one, "sixteen": sixteen}))
"""


@pytest.mark.slow
def test_out_of_memory_splits_the_batch_and_loses_nothing(tiny_model):
    """A real allocation failure (address space capped), not a simulated one."""
    # A fixed mmap threshold returns each freed tensor to the system at once, and one arena keeps
    # threads from reserving their own: what the process has mapped then follows what it uses.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_ARENA_MAX="1")
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_RUN, str(tiny_model)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["one"] * 2 < outcome["sixteen"] // 2, "one clip should need well under half the batch"
    assert outcome["split"] == outcome["alone"]
    assert "out of memory on a batch of 16; retrying in halves" in result.stderr


def test_batches_follow_length_and_bound_padding_and_memory():
    from acecap.audio import Clip
    from acecap.batching import BatchLimits, batches

    clips = [Clip(np.zeros(int(seconds * 16000), dtype=np.float32), str(seconds)) for seconds in (9, 1, 2, 1.1, 30, 8)]

    def sources(limits):
        return [[c.source for c in batch] for batch in batches(clips, 300.0, limits)]

    assert sources(BatchLimits(clips=3, padding=0.25)) == [["1", "1.1"], ["2"], ["8", "9"], ["30"]]
    assert sources(BatchLimits(clips=1, padding=0.25)) == [["1"], ["1.1"], ["2"], ["8"], ["9"], ["30"]]
    # Without a padding cap (the static decoder prefills each clip unpadded) only the size cuts.
    assert sources(BatchLimits(clips=4)) == [["1", "1.1", "2", "8"], ["9", "30"]]
    # Memory: 5 bytes a clip plus 1 a second, at most 30 bytes: 1, 1.1 and 2 s take 19.1; adding 8 s, 32.1.
    assert sources(BatchLimits(clips=8, cache_bytes=30, clip_bytes=5, second_bytes=1)) == [
        ["1", "1.1", "2"],
        ["8", "9"],
        ["30"],
    ]


def test_a_name_with_a_newline_is_shown_on_one_line():
    from acecap.inputs import shown

    odd = os.fsdecode(b"a\nb\tc\x7f\xe9.wav")
    assert shown(odd) == "a\\nb\\tc\\x7f\\xe9.wav" and shown("plain song.wav") == "plain song.wav"
