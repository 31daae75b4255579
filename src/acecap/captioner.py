"""The Captioner: one loaded model, audio in, captions (or lyrics) out. Every command goes through it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import compat, devices
from . import quant as quantization
from .audio import SAMPLE_RATE, Clip, load_audio, to_clip
from .decode import PREFILL_TOKENS, cache_bytes_per_token, choose_decoder
from .encoder import encode_audio
from .engine import stream
from .features import FEATURE_MARGIN, LogMel, audio_tokens, feature_frames
from .generate import Decoding
from .hub import resolve_model, revision_of
from .model import TASKS, load_processor, load_thinker, render_prompt, resident_bytes
from .waves import Finished, PaddedWave, Pending, StaticWave, run_wave

log = logging.getLogger("acecap")

DEFAULT_MAX_DURATION = 300.0  # seconds: what the model's feature extractor was built for
AUDIO_TOKENS_PER_SECOND = 25
CHAT_CACHE = 256  # prompts whose token ids are kept (the oldest goes first)
Key = TypeVar("Key")


@dataclass
class Timings:
    load_s: float  # model load (once per Captioner)
    audio_s: float  # decoding this file
    first_token_s: float  # features, encoder and prefill up to the first token, for the clips prefilled together
    decode_tokens_per_s: float  # this clip's stream, after its first token
    total_s: float  # from its prefill's start to its last token


@dataclass
class Result:
    """One caption (or lyrics) and everything needed to trust and reproduce it."""

    source: str
    text: str
    tokens: int  # generated tokens, the end token included
    prompt_tokens: int  # the chat text's tokens with the audio's, as the model read them
    finished: bool  # False when max_new_tokens cut the text
    duration: float  # seconds of audio in the input
    truncated: bool  # True when only the first `max_duration` seconds were captioned
    partial: str | None  # how the file falls short of its header (decoded with allow_partial), else None
    captioned_seconds: float
    task: str
    prompt: str
    model: str
    device: str
    dtype: str
    timings: Timings
    quant: str = "none"  # the language model's linear layers: none, int8, int4 or fp8

    def to_dict(self) -> dict:
        return asdict(self)


class Captioner:
    """The thinker and processor of one checkpoint on one device.

    >>> captioner = Captioner.from_pretrained()            # ACE-Step/acestep-captioner, best device
    >>> captioner.caption("song.mp3").text
    """

    def __init__(
        self,
        thinker,
        processor,
        *,
        task: str,
        prompt: str,
        model_name: str,
        load_s: float,
        revision: str | None = None,
        decoder: str = "auto",
        prefill_tokens: int = PREFILL_TOKENS,
        quant: str = "none",
    ):
        self.thinker = thinker
        self.quant = quant
        self.processor = processor
        self.task = task
        self.prompt = prompt
        self.model_name = model_name
        self.revision = revision  # the hub commit, where the folder is a hub snapshot
        self.load_s = load_s
        self.device: torch.device = thinker.device
        self.dtype: torch.dtype = thinker.dtype
        self.decoder = choose_decoder(decoder, self.device)
        self.chat_text = render_prompt(processor, prompt)
        tokenizer = processor.tokenizer
        self.end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.pad_id = tokenizer.pad_token_id
        self.audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        self.prompt_tokens = len(tokenizer(self.chat_text)["input_ids"])  # one <|AUDIO|> placeholder
        self.context = thinker.config.text_config.max_position_embeddings
        if prefill_tokens < 1:
            raise ValueError("the prefill budget must be at least one token")
        self.prefill_tokens = prefill_tokens  # prompt tokens per prefill pass
        self.log_mel = LogMel(processor.feature_extractor, self.device)
        self._chat_ids: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        task: str = "caption",
        device: str = "auto",
        dtype: str = "auto",
        hub: str = "auto",
        prompt: str | None = None,
        decoder: str = "auto",
        prefill_tokens: int = PREFILL_TOKENS,
        quant: str = "none",
    ) -> Captioner:
        """Load a checkpoint (folder or hub id; default: the task's ACE-Step model) onto a device.

        `decoder`: "static" (static KV cache, each clip prefilled unpadded), "compiled" (the same, the whole
        decode step compiled by torch.compile once per process; on the CPU minutes of compiling first),
        "graphs" (the static step replayed as a CUDA graph), "transformers" (the library's generate(): the
        slower reference), or "auto" (graphs on CUDA, else static). `prefill_tokens`: the most prompt tokens
        one prefill pass takes (several clips packed; a longer prompt in several passes).
        `quant`: "int8", "int4" or "fp8" quantizes the language model's linear layers as they load (dtype auto
        is then bf16); a folder written by `acecap quantize` is already quantized.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: use {' or '.join(TASKS)}")
        torch_device = devices.resolve_device(device)
        quantized_dtype = devices.resolve_dtype("bf16" if dtype == "auto" else dtype, torch_device)
        quantization.check(quant, torch_device, quantized_dtype)  # before any download
        name = str(model or TASKS[task].model_id)
        folder = resolve_model(name, hub)
        saved = quantization.prequantized(folder)
        quantized = quant != "none" or saved is not None
        torch_dtype = quantized_dtype if quantized else devices.resolve_dtype(dtype, torch_device)
        if saved:
            quantization.check_prequantized(saved, folder, quant, torch_device, torch_dtype)
            quant = saved["quant"]
        weights = resident_bytes(folder, quant, torch_dtype, torch_device.type)
        devices.check_fits(weights, torch_device, torch_dtype, quant=quant)
        start = time.perf_counter()
        thinker = load_thinker(folder, torch_device, torch_dtype, quant)
        processor = load_processor(folder)
        load_s = devices.now(torch_device) - start
        prompt = prompt or TASKS[task].prompt
        revision = revision_of(folder)
        return cls(
            thinker,
            processor,
            task=task,
            prompt=prompt,
            model_name=name,
            load_s=load_s,
            revision=revision,
            decoder=decoder,
            prefill_tokens=prefill_tokens,
            quant=quant,
        )

    def max_duration_limit(self, decoding: Decoding) -> float:
        """The longest audio (s) whose tokens, the prompt and max_new_tokens fit the context."""
        free = self.context - self.prompt_tokens - decoding.max_new_tokens
        return max(0.0, free / AUDIO_TOKENS_PER_SECOND)

    def caption(
        self,
        audio: str | Path | np.ndarray | Clip,
        decoding: Decoding | None = None,
        *,
        sample_rate: int | None = None,
        max_duration: float = DEFAULT_MAX_DURATION,
    ) -> Result:
        """Caption one file, array (give `sample_rate`) or Clip."""
        start = time.perf_counter()
        if isinstance(audio, Clip):
            clip = audio
        elif isinstance(audio, np.ndarray):
            if sample_rate is None:
                raise ValueError("an array needs its sample_rate")
            clip = to_clip(audio, sample_rate)
        else:
            clip = load_audio(audio, max_seconds=max_duration)
        audio_s = time.perf_counter() - start
        return self.caption_clips([clip], decoding, max_duration=max_duration, audio_s=[audio_s])[0]

    def caption_clips(
        self,
        clips: list[Clip],
        decoding: Decoding | None = None,
        *,
        max_duration: float = DEFAULT_MAX_DURATION,
        audio_s: list[float] | None = None,
        prompts: list[str] | None = None,
        on_step: Callable[[list[int]], None] | None = None,
    ) -> list[Result]:
        """Caption decoded clips as one batch, each in its own row; errors (out of memory too) propagate.

        `prompts`: one per clip instead of the captioner's own. `on_step`: called after every decoding
        step with each clip's new token (rows that have ended get the pad token), for streaming.
        """
        if not clips:
            return []
        decoding = decoding or Decoding()
        prompts = prompts or [self.prompt] * len(clips)
        if len(prompts) != len(clips):
            raise ValueError(f"{len(prompts)} prompts for {len(clips)} clips")
        self._check_duration(max_duration, decoding)
        pendings = [
            self._pending(i, clip, decoding, max_duration, prompt)
            for i, (clip, prompt) in enumerate(zip(clips, prompts, strict=True))
        ]
        hook = None
        if on_step is not None:

            def hook(pairs: list[tuple[Any, int]]) -> None:
                tokens = [self.pad_id] * len(clips)
                for key, token in pairs:
                    tokens[key[0]] = token
                on_step(tokens)

        wave = self._wave(sorted(p.need for p in pendings), decoding)
        finished = run_wave(wave, pendings, self.end_ids, hook)
        return [self._result(done, audio_s[i] if audio_s else 0.0) for i, done in enumerate(finished)]

    def caption_stream(
        self,
        items: Iterable[tuple[Key, Clip]],
        decoding: Decoding | None = None,
        *,
        max_duration: float = DEFAULT_MAX_DURATION,
        rows: int = 32,
        cache_bytes: int | None = None,
        prompt: str | None = None,
        on_token: Callable[[Key, int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[Key, Result | str]]:
        """Caption a stream of (key, clip) pairs: each key with its Result, or the reason it failed, as each
        clip ends (continuous batching: a row whose clip ended takes the next clip that fits).

        At most `rows` clips decode together, within `cache_bytes` of KV cache. Out of memory halves the rows
        and retries; a failure of another kind is retried clip by clip, so only a clip that fails alone gets
        an error. `items` is read from another thread, a few clips ahead of the device. Once `stop()` is true,
        the clips on the device finish and the stream ends.
        """
        if rows < 1:
            raise ValueError(f"rows must be at least 1, not {rows}")
        decoding = decoding or Decoding()
        prompt = prompt or self.prompt
        self._check_duration(max_duration, decoding)
        per_token = cache_bytes_per_token(self.thinker)
        source = (self._pending((key, i), clip, decoding, max_duration, prompt) for i, (key, clip) in enumerate(items))

        def on_step(pairs: list[tuple[Any, int]]) -> None:
            for key, token in pairs:
                on_token(key[0][0], token)

        outcomes = stream(
            lambda capacities: self._wave(capacities, decoding),
            source,
            self.end_ids,
            self.device,
            rows=rows,
            cache_tokens=None if cache_bytes is None else cache_bytes // per_token,
            padding=0.25 if self.decoder == "transformers" else None,
            on_step=on_step if on_token is not None else None,
            stop=stop,
        )
        for key, outcome in outcomes:
            yield key[0][0], outcome if isinstance(outcome, str) else self._result(outcome, 0.0)

    def _check_duration(self, max_duration: float, decoding: Decoding) -> None:
        limit = self.max_duration_limit(decoding)
        if not 0 < max_duration <= limit:
            raise ValueError(
                f"max duration must be in (0, {limit:.0f}] s with {decoding.max_new_tokens} new tokens: the "
                f"{self.context}-token context holds {AUDIO_TOKENS_PER_SECOND} tokens per second of audio, "
                "the prompt and the new tokens"
            )

    def _pending(self, key: Any, clip: Clip, decoding: Decoding, max_duration: float, prompt: str) -> Pending:
        """A clip as the engine takes it: its key carries what its Result reports."""
        text = self.chat_text if prompt == self.prompt else render_prompt(self.processor, prompt)
        samples = clip.samples[: int(max_duration * SAMPLE_RATE)]
        if clip.duration > max_duration:
            log.warning("%s: %.1f s long; captioning the first %g s", clip.source, clip.duration, max_duration)
        prefix, suffix = self._chat_parts(text)
        prompt_tokens = len(prefix) + audio_tokens(feature_frames(len(samples))) + len(suffix)
        captioned = len(samples) / SAMPLE_RATE
        meta = (clip.source, clip.duration, clip.duration > max_duration, clip.partial, captioned, prompt)
        return Pending((key, meta), prompt_tokens + decoding.max_new_tokens, captioned, (samples, text))

    def _result(self, done: Finished, audio_s: float) -> Result:
        _, (source, duration, truncated, partial, captioned, prompt) = done.key
        text = self.processor.tokenizer.decode(done.tokens, skip_special_tokens=True).strip()
        timings = Timings(
            load_s=self.load_s,
            audio_s=audio_s,
            first_token_s=done.first_token_s,
            decode_tokens_per_s=done.decode_tokens_per_s,
            total_s=done.total_s,
        )
        return Result(
            source=source,
            text=text,
            tokens=len(done.tokens),
            prompt_tokens=done.prompt_tokens,
            finished=done.finished,
            duration=duration,
            truncated=truncated,
            partial=partial,
            captioned_seconds=captioned,
            task=self.task,
            prompt=prompt,
            model=self.model_name,
            device=str(self.device),
            dtype=devices.dtype_name(self.dtype),
            timings=timings,
            quant=self.quant,
        )

    def _wave(self, capacities: list[int], decoding: Decoding):
        """A wave of rows of these capacities for the captioner's decoder."""
        if self.decoder == "transformers":
            return PaddedWave(self.thinker, len(capacities), decoding, self.end_ids, self.pad_id, self._padded)
        return StaticWave(
            self.thinker, capacities, decoding, self.end_ids, self.decoder, self._prompts, self.prefill_tokens
        )

    def _chat_parts(self, text: str) -> tuple[list[int], list[int]]:
        """The chat text's token ids before and after its one audio placeholder."""
        if text not in self._chat_ids:
            ids = self.processor.tokenizer(text)["input_ids"]
            if ids.count(self.audio_id) != 1:  # a prompt naming <|AUDIO|> itself would read a placeholder as text
                raise ValueError("the prompt must not contain the audio placeholder <|AUDIO|>")
            at = ids.index(self.audio_id)
            if len(self._chat_ids) >= CHAT_CACHE:  # a server's callers may send a new prompt every time
                del self._chat_ids[next(iter(self._chat_ids))]
            self._chat_ids[text] = (ids[:at], ids[at + 1 :])
        return self._chat_ids[text]

    def _prompts(
        self, payloads: list[tuple[np.ndarray, str]], layer_outputs: list[list[torch.Tensor]] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each clip's prompt token ids and input embeddings, its audio encoded in.

        Features for the whole group on the device in one batch, then every 2 s window of the group through
        the audio encoder together; `layer_outputs` collects each encoder layer's rows (for `compare`).
        """
        if any(len(samples) == 0 for samples, _ in payloads):
            raise ValueError("no audio samples to caption")
        features, frames = self.log_mel([samples for samples, _ in payloads])
        tower = compat.thinker_parts(self.thinker).audio_tower
        per_window = audio_tokens(2 * tower.n_window)
        with torch.inference_mode():
            audio = encode_audio(
                tower, features.to(self.dtype), frames, max(1, self.prefill_tokens // per_window), layer_outputs
            )
            embed = compat.text_model(self.thinker).embed_tokens
            prompts, used = [], 0
            for (_, text), count in zip(payloads, frames, strict=True):
                prefix, suffix = self._chat_parts(text)
                tokens = audio_tokens(count)
                ids = torch.tensor(prefix + [self.audio_id] * tokens + suffix, device=self.device)
                row = embed(ids)
                row[len(prefix) : len(prefix) + tokens] = audio[used : used + tokens].to(row.dtype)
                used += tokens
                prompts.append((ids, row))
        return prompts

    def _padded(self, payloads: list[tuple[np.ndarray, str]]) -> dict:
        return self._features([samples for samples, _ in payloads], [text for _, text in payloads])

    def _features(self, samples: list[np.ndarray], texts: list[str] | None = None) -> dict:
        """The processor's inputs for clips with their chat texts (default: the captioner's prompt): the
        transformers decoder's path, and the reference the device features are tested against."""
        longest = max(len(s) for s in samples)
        # A fresh dict per call: transformers 4.57 empties the audio_kwargs it is given.
        audio_kwargs = {"sampling_rate": SAMPLE_RATE, "max_length": longest + FEATURE_MARGIN, "truncation": True}
        inputs = self.processor(
            text=texts or [self.chat_text] * len(samples),
            audio=samples,
            padding=True,
            return_tensors="pt",
            audio_kwargs=audio_kwargs,
        )
        inputs = inputs.to(self.device)
        inputs["input_features"] = inputs["input_features"].to(self.dtype)
        return dict(inputs)
