import numpy as np
import pytest
import soundfile

from acecap.audio import SAMPLE_RATE, AudioError, load_audio, to_clip


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
