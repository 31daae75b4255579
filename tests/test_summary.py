"""annotate's summary tells what worked but may be wrong: cut, looping, truncated, silent outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import run_acecap

from acecap.catalog import Catalog
from acecap.records import load_records
from acecap.repetition import compression_ratio, is_repetitive

CAPTION = (
    "An energetic electronic dance track built on a driving four-on-the-floor kick, crisp hi-hats and a deep, "
    "pulsing sub-bass. Bright supersaw chords carry the harmony while a plucky lead arpeggio weaves around the "
    "hook. A female vocalist sings in English with a breathy tone, drenched in reverb and delay. The arrangement "
    "builds through risers into an explosive drop, then breaks down to filtered pads before returning."
)
LYRICS = "\n".join(
    ["[Verse]", "Walking down the empty street", "Counting every heartbeat", "[Chorus]"]
    + ["Hold on, hold on to me", "Hold on, hold on to me", "Never let me go"] * 3
    + ["[Outro]", "Oh oh oh oh", "Oh oh oh oh", "Hold on, hold on to me"]
)


def test_loops_are_told_from_songs_that_repeat_themselves():
    assert not is_repetitive(CAPTION) and compression_ratio(CAPTION) < 2
    looped = CAPTION[:120] + " with a warm piano melody," * 12 + " with a warm pi"  # cut at the token limit
    assert is_repetitive(looped)
    assert is_repetitive(CAPTION[:200] + " The drums, the bass, the synths, the voice." * 5)
    varied = CAPTION[:80] + "".join(f" the drop hits, the crowd {'sings' if i % 3 else 'jumps'}," for i in range(9))
    assert is_repetitive(varied)  # not one phrase back to back, but compresses like a loop
    assert is_repetitive("一首流行歌曲，" + "吉他和钢琴，" * 10)
    assert not is_repetitive("very very very very good") and not is_repetitive("Wow!!!!!!!!!!!!!!!!!")
    assert not is_repetitive(LYRICS, "lyrics")  # a chorus sung three times, an outro's "oh oh oh oh"
    assert is_repetitive(LYRICS + "\nNever let me go" * 10, "lyrics")
    assert not is_repetitive("Na na na na, na na na na, hey hey hey, goodbye", "lyrics")


def tones(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        soundfile.write(folder / f"noise{index}.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    soundfile.write(folder / "silence.wav", np.zeros(16000, np.float32), 16000)
    soundfile.write(folder / "long.wav", (rng.standard_normal(40000) * 0.1).astype(np.float32), 16000)
    return folder


def annotate_cli(tiny_model, songs: Path, out: Path, *args: str):
    return run_acecap("annotate", str(songs), "-o", str(out), "--model", str(tiny_model), "--quiet", *args)


@pytest.mark.slow
def test_the_summary_counts_cut_truncated_silent_and_looping_outputs(tiny_model, tmp_path):
    songs, out = tones(tmp_path / "songs"), tmp_path / "out"
    # The tiny model's random weights never end a text: every one is cut at --max-new-tokens.
    result = annotate_cli(tiny_model, songs, out, "--max-new-tokens", "3", "--max-duration", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "captioned      5" in lines and "failed         0" in lines
    assert "  unfinished   5: cut at --max-new-tokens 3 before the model finished; run again with a higher " \
           "--max-new-tokens and those files are redone" in lines  # fmt: skip
    assert any(line.startswith("  truncated    1: longer than what was captioned") for line in lines)
    assert any(line.startswith("  silent       1: nothing audible") for line in lines)
    assert "repetitive" not in result.stderr
    same = annotate_cli(tiny_model, songs, out, "--max-new-tokens", "3", "--max-duration", "2")
    assert "files          5 (5 done earlier)" in same.stderr, same.stderr
    # More tokens allowed: the cut texts are redone. A repetition penalty below 1 makes the model loop.
    more = annotate_cli(tiny_model, songs, out, "--max-new-tokens", "48", "--max-duration", "2",
                        "--repetition-penalty", "0.05")  # fmt: skip
    assert more.returncode == 0 and "files          5 (0 done earlier)" in more.stderr, more.stderr
    records = load_records(out)
    looping = sum(r["repetitive"] for r in records)
    assert looping and f"  repetitive   {looping}: the text ends in a loop" in more.stderr
    # Every text redone under the new limit: cut at 48, or ended by the model (a loop may reach the end token).
    assert all(r["tokens"] > 3 and (r["finished"] or r["tokens"] == 48) for r in records)
    flagged = {Path(e.path).name: e.flags for e in Catalog(out).entries}  # what acecap review shows
    assert sum("repetitive" in flags for flags in flagged.values()) == looping
    long = next(r for r in records if r["path"].endswith("long.wav"))
    assert "truncated" in flagged["long.wav"] and ("cut" in flagged["long.wav"]) == (not long["finished"])
    assert "silent" in flagged["silence.wav"]


@pytest.mark.slow
def test_meta_is_analysed_not_captioned(tmp_path):
    songs = tones(tmp_path / "songs")
    result = run_acecap("annotate", str(songs), "-o", str(tmp_path / "out"), "--tasks", "meta")
    assert result.returncode == 0, result.stderr
    assert "analysed       5" in result.stderr.splitlines() and "captioned" not in result.stderr
    assert "worker 0: reading tags and analysing the signal on cpu (no model)" in result.stderr
    assert "model on" not in result.stderr
