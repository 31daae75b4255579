"""Log-mel features on the device, a batch of clips at once: WhisperFeatureExtractor's own computation.

The processor pads every clip, runs a CPU STFT and a mel filterbank one call at a time, and hands back
numpy arrays; here the same operations (torch.stft with a periodic Hann window, |X|^2 without the last
frame, the extractor's own mel filters, log10 clamped at 1e-10, each clip floored at its maximum minus 8,
then (x + 4) / 4) run on the device over a padded batch. Each clip is followed by FEATURE_MARGIN zero
samples, as acecap always asked of the processor, so its last frames see silence; its maximum is taken
over the frames the processor would have computed for it alone, so padding to the batch changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch

# Zero samples after each clip so its last STFT frames see silence, exactly as with the processor's
# default padding to 300 s, while the batch is padded only to its longest clip.
FEATURE_MARGIN = 480
LOG_FLOOR = 1e-10  # mel power below this is clamped before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below each clip's loudest bin


def feature_frames(samples: int, hop_length: int = 160) -> int:
    """Mel frames the encoder reads for a clip of `samples` samples (the processor's attention mask)."""
    return -(-samples // hop_length)


def audio_tokens(frames: int) -> int:
    """Audio tokens the encoder makes of `frames` mel frames: a stride-2 convolution, then pooling by 2."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class LogMel:
    """The feature extractor of one processor, on one device."""

    def __init__(self, extractor, device: torch.device):
        if getattr(extractor, "dither", 0.0):
            raise ValueError("the feature extractor dithers; acecap computes features without noise")
        self.n_fft = extractor.n_fft
        self.hop_length = extractor.hop_length
        self.device = device
        self.window = torch.hann_window(self.n_fft, device=device)
        # (mels, n_fft // 2 + 1): the extractor's filters, as its torch path uses them (float32).
        self.filters = torch.from_numpy(np.asarray(extractor.mel_filters)).to(device, torch.float32).T.contiguous()

    def __call__(self, clips: list[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Features (clips, mels, frames) in float32 on the device, and each clip's frame count.

        Frames past a clip's count are padding: the audio encoder is told each clip's count and reads
        no further.
        """
        lengths = [len(clip) for clip in clips]
        padded = [length + FEATURE_MARGIN for length in lengths]
        waveform = torch.zeros(len(clips), max(padded), dtype=torch.float32, device=self.device)
        for row, clip in enumerate(clips):
            source = torch.as_tensor(clip) if isinstance(clip, torch.Tensor) else torch.from_numpy(clip)
            waveform[row, : lengths[row]] = source.to(self.device, torch.float32, non_blocking=True)
        stft = torch.stft(waveform, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()  # the last frame is dropped, as the extractor does
        log_spec = torch.clamp(self.filters @ power, min=LOG_FLOOR).log10()
        # Each clip's own frames, as the processor computes them for that clip padded to its own length.
        own = torch.tensor([m // self.hop_length for m in padded], device=self.device)
        inside = torch.arange(log_spec.shape[-1], device=self.device) < own[:, None]
        loudest = log_spec.masked_fill(~inside[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, loudest - DYNAMIC_RANGE)
        return (log_spec + 4.0) / 4.0, [feature_frames(length, self.hop_length) for length in lengths]
