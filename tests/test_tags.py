"""Tempo and key from files' tags: real mp3, flac, m4a and ogg files, tagged by mutagen as music libraries do."""

import av
import numpy as np
import pytest
import soundfile
from mutagen.flac import FLAC
from mutagen.id3 import ID3, TBPM, TKEY, TXXX
from mutagen.mp4 import MP4, MP4FreeForm
from mutagen.oggvorbis import OggVorbis

from acecap import tags
from acecap.meta import describe

RATE = 44100


def tone(seconds: float = 1.0) -> np.ndarray:
    return (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def encode(path, codec: str) -> None:
    """An mp3 or m4a file, encoded by FFmpeg through PyAV (as a music library would have one)."""
    samples = tone()
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def mp3(path, bpm=None, key=None, initialkey=None):
    encode(path, "libmp3lame")
    id3 = ID3()
    if bpm is not None:
        id3.add(TBPM(encoding=3, text=[bpm]))
    if key is not None:
        id3.add(TKEY(encoding=3, text=[key]))
    if initialkey is not None:
        id3.add(TXXX(encoding=3, desc="INITIALKEY", text=[initialkey]))
    id3.save(path)
    return path


def flac(path, **fields):
    soundfile.write(path, tone(), RATE)
    audio = FLAC(path)
    for name, value in fields.items():
        audio[name] = value
    audio.save()
    return path


def m4a(path, tmpo=None, initialkey=None, bpm_text=None):
    encode(path, "aac")
    audio = MP4(path)
    if tmpo is not None:
        audio["tmpo"] = [tmpo]
    if initialkey is not None:
        audio["----:com.apple.iTunes:initialkey"] = [MP4FreeForm(initialkey.encode())]
    if bpm_text is not None:
        audio["----:com.apple.iTunes:BPM"] = [MP4FreeForm(bpm_text.encode())]
    audio.save()
    return path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("Am", "A minor"),
        ("A minor", "A minor"),
        ("a min", "A minor"),
        ("F#m", "F# minor"),
        ("F♯ minor", "F# minor"),
        ("Gb", "F# major"),
        ("B♭m", "A# minor"),
        ("Bbmaj", "A# major"),
        ("C", "C major"),
        ("E-flat major", "D# major"),
        ("8A", "A minor"),
        ("8B", "C major"),
        ("1A", "G# minor"),
        ("12B", "E major"),
        ("1d", "C major"),
        ("1m", "A minor"),
        ("12m", "D minor"),
        ("8A - Am", "A minor"),
        ("Am/8A", "A minor"),
        ("C#m (12A)", "C# minor"),
        ("o", None),
        ("", None),
        ("H", None),
        ("13A", None),
    ],
)
def test_key_notations(text, key):
    assert tags.parse_key(text) == key


@pytest.mark.parametrize(
    ("text", "bpm"),
    [("128", 128), ("92.5", 93), ("92,4", 92), ("174 BPM", 174), ("0", None), ("", None), ("fast", None),
     ("400", None), ("12", None)],
)  # fmt: skip
def test_bpm_values(text, bpm):
    assert tags.parse_bpm(text) == bpm


def test_id3_in_mp3(tmp_path):
    found = tags.read(mp3(tmp_path / "a.mp3", bpm="128", key="F#m"))
    assert (found.bpm, found.keyscale) == (128, "F# minor")
    assert found.found == {"TBPM": "128", "TKEY": "F#m"}
    # Mixed In Key and Traktor write the key as a TXXX INITIALKEY frame, often in Camelot notation.
    found = tags.read(mp3(tmp_path / "b.mp3", bpm="95.8", initialkey="8A"))
    assert (found.bpm, found.keyscale) == (96, "A minor")


def test_vorbis_comments_in_flac_and_ogg(tmp_path):
    found = tags.read(flac(tmp_path / "a.flac", BPM="92", INITIALKEY="1d"))
    assert (found.bpm, found.keyscale) == (92, "C major")
    found = tags.read(flac(tmp_path / "b.flac", TEMPO="140", KEY="Ebm"))
    assert (found.bpm, found.keyscale) == (140, "D# minor")
    path = tmp_path / "c.ogg"
    soundfile.write(path, tone(), RATE, format="OGG")
    audio = OggVorbis(path)
    audio["bpm"], audio["initialkey"] = "77", "3m"  # Open Key
    audio.save()
    found = tags.read(path)
    assert (found.bpm, found.keyscale) == (77, "B minor")


def test_mp4_tmpo_and_freeform_key_in_m4a(tmp_path):
    found = tags.read(m4a(tmp_path / "a.m4a", tmpo=100, initialkey="Gb"))
    assert (found.bpm, found.keyscale) == (100, "F# major")
    assert found.found["TMPO"] == "100"  # read from the box tree: FFmpeg does not surface tmpo
    found = tags.read(m4a(tmp_path / "b.m4a", bpm_text="121", initialkey="11B"))
    assert (found.bpm, found.keyscale) == (121, "A major")


def test_untagged_unreadable_and_nonsense_tags_give_nothing(tmp_path):
    assert tags.read(flac(tmp_path / "plain.flac")) == tags.Tagged(None, None, {})
    (tmp_path / "junk.mp3").write_bytes(b"not audio at all" * 10)
    assert tags.read(tmp_path / "junk.mp3") == tags.Tagged(None, None, {})
    assert tags.read(tmp_path / "missing.flac") == tags.Tagged(None, None, {})
    found = tags.read(flac(tmp_path / "odd.flac", BPM="0", INITIALKEY="o"))
    assert (found.bpm, found.keyscale) == (None, None) and found.found == {"BPM": "0", "INITIALKEY": "o"}


def test_tags_win_and_each_value_says_where_it_came_from(tmp_path):
    path = flac(tmp_path / "song.flac", BPM="128", INITIALKEY="8A")
    samples = np.zeros(16000 * 2, dtype=np.float32)  # too short for the signal to say anything
    both = describe(path, samples)
    assert (both.bpm, both.bpm_source, both.bpm_confidence) == (128, "tags", 1.0)
    assert (both.keyscale, both.keyscale_source, both.keyscale_confidence) == ("A minor", "tags", 1.0)
    assert (both.timesignature, both.timesignature_source) == (None, None)  # tags have no metre
    assert both.tags == {"BPM": "128", "INITIALKEY": "8A"}
    signal_only = describe(path, samples, ("signal",))
    assert (signal_only.bpm, signal_only.keyscale, signal_only.tags) == (None, None, {})
    with pytest.raises(ValueError, match="meta sources"):
        describe(path, samples, ("tags", "guess"))
