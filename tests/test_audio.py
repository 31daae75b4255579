import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import RATE, encode_with_pyav, pcm_wav, tone

from acecap.audio import SAMPLE_RATE, AudioError, decode_audio, load_audio, to_clip


@pytest.mark.parametrize("name", ["tone.wav", "tone.flac", "tone.mp3", "tone.ogg", "tone.opus", "tone.m4a"])
def test_every_format_decodes_to_16k_mono(audio_dir, name):
    clip = load_audio(audio_dir / name)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    # Lossy codecs add encoder delay and padding: a few tens of milliseconds at most.
    assert abs(clip.duration - 3.0) < 0.1
    spectrum = np.abs(np.fft.rfft(clip.samples))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(clip.samples)
    assert abs(peak_hz - 440) < 5  # the tone survives decoding and resampling


def test_stereo_24_bit_44k_is_mixed_to_mono(audio_dir):
    clip = load_audio(audio_dir / "stereo24.wav")
    original, rate = soundfile.read(audio_dir / "stereo24.wav", dtype="float32")
    assert rate == 44100 and original.shape[1] == 2
    assert len(clip.samples) == 3 * SAMPLE_RATE
    # The mix of a channel and its half is 0.75 of the first channel's level.
    assert np.isclose(np.abs(clip.samples).max(), 0.75 * np.abs(original[:, 0]).max(), rtol=0.02)


@pytest.mark.parametrize(
    "name, reason",
    [("notes.txt", "not an audio file"), ("empty.wav", "empty file"), ("missing.wav", "no such file")],
)
def test_unusable_files_say_why(audio_dir, name, reason):
    with pytest.raises(AudioError, match=reason):
        load_audio(audio_dir / name)


def test_folder_is_not_audio(audio_dir):
    with pytest.raises(AudioError, match="folder"):
        load_audio(audio_dir)


def test_truncated_file_decodes_what_is_there_or_says_why(audio_dir, tmp_path):
    data = (audio_dir / "tone.flac").read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    try:
        clip = load_audio(cut)
    except AudioError as error:
        assert str(error)
    else:
        assert 0 < clip.duration < 3.0


def test_arrays_are_checked_and_resampled():
    clip = to_clip(np.zeros((48000, 2), dtype=np.float32), 48000)
    assert len(clip.samples) == SAMPLE_RATE
    with pytest.raises(AudioError, match="NaN"):
        to_clip(np.array([0.0, np.nan], dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="zero length"):
        to_clip(np.zeros(0, dtype=np.float32), SAMPLE_RATE)


# ---- declared length, partial files, decoding only what is used -------------------------------------


def encode_mp3(path: Path, seconds: float, xing: bool) -> Path:
    """An MP3 through FFmpeg's LAME encoder, with or without the Xing/Info frame that declares its length."""
    import av

    samples = tone(seconds)
    with av.open(str(path), "w", options={} if xing else {"write_xing": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=RATE)
        stream.layout = "mono"
        for start in range(0, len(samples), 1152):
            frame = av.AudioFrame.from_ndarray(
                samples[start : start + 1152].reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def cut(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    target = path.with_name(f"cut-{path.name}")
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def test_a_wav_holding_less_than_its_header_declares_is_refused_or_flagged(tmp_path):
    short = pcm_wav(tmp_path / "short.wav", tone(0.05), RATE, declared_frames=3 * RATE)  # 3 s promised, 50 ms held
    with pytest.raises(AudioError, match=r"holds 0.05 s of the 3.00 s its header declares.*--allow-partial"):
        load_audio(short)
    clip = load_audio(short, allow_partial=True)
    assert clip.partial == "holds 0.05 s of the 3.00 s its header declares"
    assert clip.duration == pytest.approx(0.05) and len(clip.samples) == 800
    whole = pcm_wav(tmp_path / "whole.wav", tone(3.0), RATE)
    assert load_audio(whole).partial is None and load_audio(whole).duration == pytest.approx(3.0)


@pytest.mark.parametrize("max_seconds", [None, 2.0])
def test_cut_files_with_a_declared_length_are_found_whether_or_not_decoding_reaches_the_cut(
    audio_dir, tmp_path, max_seconds
):
    """mp3 (Xing frame count), flac (STREAMINFO), m4a with its index first, webm (Duration): cut in half.
    With max_seconds below the cut, the end is probed where the header says it is."""
    mp3 = encode_mp3(tmp_path / "xing.mp3", 30.0, xing=True)
    m4a = encode_with_pyav(tmp_path / "song.m4a", tone(30.0), RATE, "aac", movflags="+faststart")
    webm = encode_with_pyav(tmp_path / "song.webm", tone(30.0, 48000), 48000, "libopus")
    flac = tmp_path / "long.flac"
    soundfile.write(flac, tone(30.0), RATE)
    for whole in (mp3, m4a, webm, flac):
        clip = load_audio(whole, max_seconds=max_seconds)
        assert clip.partial is None and abs(clip.duration - 30.0) < 0.1, whole
        half = cut(whole)
        with pytest.raises(AudioError, match="cut short or damaged"):
            load_audio(half, max_seconds=max_seconds)
        partial = load_audio(half, max_seconds=max_seconds, allow_partial=True)
        assert partial.partial and 13.0 < partial.duration < 17.0, (half, partial.duration)
        assert partial.decoded_s == pytest.approx(min(max_seconds or partial.duration, partial.duration), abs=0.1)


def test_an_mp3_without_a_xing_frame_declares_no_length_so_a_cut_one_is_just_shorter(tmp_path):
    """libsndfile and FFmpeg estimate such a file's length from its size: half the file, half the length.
    Nothing in it says it was cut, so it is captioned as what it is (README: partial files)."""
    half = cut(encode_mp3(tmp_path / "plain.mp3", 30.0, xing=False))
    assert soundfile.info(half).duration == pytest.approx(15.0, abs=0.2)
    clip = load_audio(half)
    assert clip.partial is None and clip.duration == pytest.approx(15.0, abs=0.2)


def test_only_max_seconds_are_decoded_and_the_whole_length_is_still_known(audio_dir, tmp_path):
    for name in ("tone.wav", "tone.flac", "tone.mp3", "tone.ogg", "tone.opus", "tone.m4a"):
        clip = load_audio(audio_dir / name, max_seconds=1.0)
        assert len(clip.samples) == pytest.approx(SAMPLE_RATE, abs=2), name
        assert abs(clip.duration - 3.0) < 0.1, name
        whole = load_audio(audio_dir / name)
        # Block-wise resampling gives exactly the one-shot result: the first second is the same samples.
        np.testing.assert_allclose(clip.samples[: SAMPLE_RATE - 200], whole.samples[: SAMPLE_RATE - 200], atol=1e-6)
    # A 40 KB file declaring 20,000 s (a 1 Hz rate): a 300 s clip, not 1.28 GB of samples.
    tiny_rate = pcm_wav(tmp_path / "one-hertz.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 20000), 1)
    clip = load_audio(tiny_rate, max_seconds=300)
    assert clip.duration == 20000.0 and len(clip.samples) == 300 * SAMPLE_RATE
    assert decode_audio(tiny_rate.read_bytes(), max_seconds=300).duration == 20000.0


def test_block_resampling_equals_one_shot_resampling():
    import soxr

    samples = np.random.default_rng(1).uniform(-0.5, 0.5, (44100 * 25, 2)).astype(np.float32)
    expected = soxr.resample(samples.mean(axis=1), 44100, SAMPLE_RATE, quality="HQ")
    np.testing.assert_array_equal(to_clip(samples, 44100).samples, expected)


@pytest.mark.parametrize(
    "samples, rate",
    [(np.array([0.3]), 44100), (np.full(10, 0.3), 2**31 - 1)],
    ids=["one-sample-at-44.1k", "rate-2**31-1"],
)
def test_audio_that_is_nothing_at_16k_is_an_error_not_an_empty_clip(tmp_path, samples, rate):
    path = pcm_wav(tmp_path / "nothing.wav", samples, rate)
    with pytest.raises(AudioError, match="no samples at all at 16000 Hz"):
        load_audio(path)


def test_links_that_loop_and_pipes_say_what_they_are(tmp_path):
    (tmp_path / "a.wav").symlink_to(tmp_path / "b.wav")
    (tmp_path / "b.wav").symlink_to(tmp_path / "a.wav")
    with pytest.raises(AudioError, match="symlink loop"):
        load_audio(tmp_path / "a.wav")
    os.mkfifo(tmp_path / "pipe.wav")  # opening it would wait for a writer forever
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path / "pipe.wav")


def test_names_that_are_not_utf8_decode_through_both_libraries(audio_dir, tmp_path):
    for name in ("tone.wav", "tone.m4a"):  # libsndfile, then FFmpeg
        target = tmp_path / (os.fsdecode(b"latin1_\xe9\xff") + Path(name).suffix)
        target.write_bytes((audio_dir / name).read_bytes())
        assert abs(load_audio(target).duration - 3.0) < 0.1 and load_audio(target).source == str(target)


def test_audio_too_short_for_the_encoder_is_refused_not_captioned_as_nothing(tmp_path):
    from acecap.audio import MIN_SAMPLES
    from acecap.features import audio_tokens, feature_frames

    assert audio_tokens(feature_frames(MIN_SAMPLES)) == 1 and audio_tokens(feature_frames(MIN_SAMPLES - 1)) == 0
    soundfile.write(tmp_path / "click.wav", np.full(160, 0.1, np.float32), 16000)  # 10 ms
    with pytest.raises(AudioError, match="10 ms of audio: too short"):
        load_audio(tmp_path / "click.wav")
    soundfile.write(tmp_path / "blip.wav", np.full(MIN_SAMPLES, 0.1, np.float32), 16000)
    assert len(load_audio(tmp_path / "blip.wav").samples) == MIN_SAMPLES


def test_arrays_in_another_layout_or_integer_pcm_are_read_as_their_audio():
    rng = np.random.default_rng(0)
    stereo = np.clip(0.2 * rng.standard_normal((16000, 2)), -0.99, 0.99).astype(np.float32)
    with pytest.raises(AudioError, match=r"reads as 16000 channels of 2 frames: give \(frames, channels\)"):
        to_clip(stereo.T, 16000)
    pcm = np.clip(stereo * 32768, -32768, 32767).astype(np.int16)  # as scipy.io.wavfile reads a 16-bit file
    assert np.allclose(to_clip(pcm, 16000).samples, to_clip(stereo, 16000).samples, atol=1e-3)
    with pytest.raises(AudioError, match="expected numbers"):
        to_clip(np.array(["a"] * 1000), 16000)


def test_decode_audio_takes_any_bytes_like_data(audio_dir):
    data = (audio_dir / "tone.wav").read_bytes()
    expected = decode_audio(data).samples
    for view in (bytearray(data), memoryview(data)):
        assert np.array_equal(decode_audio(view).samples, expected)
    with pytest.raises(TypeError, match="use load_audio for a path"):
        decode_audio(str(audio_dir / "tone.wav"))
