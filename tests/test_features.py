"""Device features and the batched audio encoder against the processor and the library's own encoder."""

import numpy as np
import pytest
import torch

from acecap import Captioner, compat
from acecap.encoder import encode_audio
from acecap.features import FEATURE_MARGIN, LogMel, audio_tokens, feature_frames

# Largest difference allowed against the processor's log-mel, in its own units ((log10 + 4) / 4): the same
# float32 operations on the CPU give 0; another device's FFT may round differently.
FEATURE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def captioner(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model, device="cpu")


def clips_of(seconds: list[float], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]
    clips.append(np.sin(np.arange(16000 * 3) / 7.0).astype(np.float32))  # one loud tone: another maximum
    return clips


def test_batched_device_features_equal_the_processors_clip_by_clip(captioner):
    extractor = captioner.processor.feature_extractor
    clips = clips_of([0.01, 0.7, 3.3, 12.01, 30.0])  # 160 samples, frame boundaries, odd lengths
    features, frames = LogMel(extractor, torch.device("cpu"))(clips)
    assert features.shape[:2] == (len(clips), 128) and features.dtype == torch.float32
    for row, clip in enumerate(clips):
        expected = extractor(clip, sampling_rate=16000, max_length=len(clip) + FEATURE_MARGIN, truncation=True,
                             padding="max_length", return_attention_mask=True, return_tensors="pt")  # fmt: skip
        count = int(expected["attention_mask"][0].sum())
        assert frames[row] == count == feature_frames(len(clip))
        ours, theirs = features[row, :, :count], expected["input_features"][0, :, :count]
        assert (ours - theirs).abs().max() <= FEATURE_TOLERANCE


def test_audio_token_count_matches_the_processors_prompt(captioner):
    for seconds in (0.05, 1.0, 2.0, 2.01, 59.99, 180.0):
        samples = np.zeros(int(16000 * seconds), dtype=np.float32)
        ids = captioner._features([samples])["input_ids"][0]
        assert int((ids == captioner.audio_id).sum()) == audio_tokens(feature_frames(len(samples)))
    assert audio_tokens(feature_frames(16000 * 10)) == 250  # 25 tokens a second


@pytest.mark.parametrize("windows_per_call", [512, 3, 1])
def test_encoder_over_all_windows_equals_the_librarys_clip_by_clip(captioner, windows_per_call):
    """Full and short windows, clips shorter than a window and across the library's old 32 s pieces."""
    clips = clips_of([0.05, 1.0, 4.0, 31.9, 32.0, 70.0])
    tower = compat.thinker_parts(captioner.thinker).audio_tower
    with torch.inference_mode():
        features, frames = captioner.log_mel(clips)
        layers = [[] for _ in tower.layers]
        ours = encode_audio(tower, features, frames, windows_per_call, layers)
        alone, alone_layers = [], [[] for _ in tower.layers]

        def keep(index: int):
            return lambda _module, _inputs, out: alone_layers[index].append(out[0] if isinstance(out, tuple) else out)

        hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(tower.layers)]
        try:
            for clip in clips:
                inputs = captioner._features([clip])
                out = captioner.thinker.get_audio_features(
                    inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
                )
                alone.append(getattr(out, "last_hidden_state", out))  # 4.57 returns the tensor
        finally:
            for hook in hooks:
                hook.remove()
    torch.testing.assert_close(ours, torch.cat(alone), atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(layers, alone_layers, strict=True):
        torch.testing.assert_close(torch.cat(mine), torch.cat(theirs), atol=1e-5, rtol=1e-5)
