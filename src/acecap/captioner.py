"""The Captioner: one loaded model, audio in, captions (or lyrics) out. Every command goes through it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import compat, devices
from . import quant as quantization
from .audio import SAMPLE_RATE, Clip, load_audio, to_clip
from .decode import choose_decoder, generate_static
from .generate import Decoding, generate
from .hub import resolve_model, revision_of
from .model import TASKS, load_processor, load_thinker, render_prompt, resident_bytes

log = logging.getLogger("acecap")

DEFAULT_MAX_DURATION = 300.0  # seconds: what the model's feature extractor was built for
AUDIO_TOKENS_PER_SECOND = 25
# Zero samples after each clip so its last STFT frames see silence, exactly as with the processor's
# default padding to 300 s, while the batch is padded only to its longest clip.
FEATURE_MARGIN = 480


@dataclass
class Timings:
    load_s: float  # model load (once per Captioner)
    audio_s: float  # decoding this file
    first_token_s: float  # features + prefill up to the first token, for the batch
    decode_tokens_per_s: float  # per stream, after the first token
    total_s: float  # features + generation for the batch


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
        quant: str = "none",
    ) -> Captioner:
        """Load a checkpoint (folder or hub id; default: the task's ACE-Step model) onto a device.

        `decoder`: "static" (static KV cache, each clip prefilled unpadded), "compiled" (the same, the whole
        decode step compiled by torch.compile once per process; on the CPU minutes of compiling first),
        "graphs" (the static step replayed as a CUDA graph), "transformers" (the library's generate(): the
        slower reference), or "auto" (graphs on CUDA, else static).
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
        """Caption decoded clips as one batch (left-padded, features padded to the longest clip).

        `prompts`: one per clip instead of the captioner's own. `on_step`: called after every decoding
        step with each clip's new token (rows that have ended get the pad token), for streaming.
        """
        decoding = decoding or Decoding()
        prompts = prompts or [self.prompt] * len(clips)
        if len(prompts) != len(clips):
            raise ValueError(f"{len(prompts)} prompts for {len(clips)} clips")
        texts = [self.chat_text if p == self.prompt else render_prompt(self.processor, p) for p in prompts]
        limit = self.max_duration_limit(decoding)
        if not 0 < max_duration <= limit:
            raise ValueError(
                f"max duration must be in (0, {limit:.0f}] s with {decoding.max_new_tokens} new tokens: the "
                f"{self.context}-token context holds {AUDIO_TOKENS_PER_SECOND} tokens per second of audio, "
                "the prompt and the new tokens"
            )
        keep = int(max_duration * SAMPLE_RATE)
        samples = [clip.samples[:keep] for clip in clips]
        for clip in clips:
            if clip.duration > max_duration:
                log.warning("%s: %.1f s long; captioning the first %g s", clip.source, clip.duration, max_duration)
        start = devices.now(self.device)
        if self.decoder == "transformers":
            inputs = self._features(samples, texts)
            prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
            generated = generate(self.thinker, inputs, decoding, self.end_ids, self.pad_id, on_step)
        else:
            ids, embeds = self._prompt_embeddings(samples, texts)
            prompt_tokens = [len(row) for row in ids]
            generated = generate_static(
                self.thinker, ids, embeds, decoding, self.end_ids, self.pad_id, self.decoder, on_step
            )
        total_s = devices.now(self.device) - start
        answers = self.processor.tokenizer.batch_decode(generated.tokens, skip_special_tokens=True)
        results = []
        for i, clip in enumerate(clips):
            timings = Timings(
                load_s=self.load_s,
                audio_s=audio_s[i] if audio_s else 0.0,
                first_token_s=total_s - generated.total_s + generated.first_token_s,
                decode_tokens_per_s=generated.decode_tokens_per_s,
                total_s=total_s,
            )
            results.append(
                Result(
                    source=clip.source,
                    text=answers[i].strip(),
                    tokens=len(generated.tokens[i]),
                    prompt_tokens=int(prompt_tokens[i]),
                    finished=generated.finished[i],
                    duration=clip.duration,
                    truncated=clip.duration > max_duration,
                    partial=clip.partial,
                    captioned_seconds=len(samples[i]) / SAMPLE_RATE,
                    task=self.task,
                    prompt=prompts[i],
                    model=self.model_name,
                    device=str(self.device),
                    dtype=devices.dtype_name(self.dtype),
                    timings=timings,
                    quant=self.quant,
                )
            )
        return results

    def _prompt_embeddings(
        self, samples: list[np.ndarray], texts: list[str] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each clip's token ids and input embeddings, the audio encoder's output merged in.

        Features are computed clip by clip (a batch padded to its longest clip repeats the STFT over
        silence), then the encoder runs once over the batch, which reads only each clip's own frames.
        """
        texts = texts or [self.chat_text] * len(samples)
        rows = [self._features([clip], [text]) for clip, text in zip(samples, texts, strict=True)]
        frames = max(row["input_features"].shape[-1] for row in rows)

        def padded(key: str) -> torch.Tensor:  # features and their mask share the frame axis
            return torch.cat([F.pad(row[key], (0, frames - row[key].shape[-1])) for row in rows])

        features, mask = padded("input_features"), padded("feature_attention_mask")
        prompts = [row["input_ids"][0] for row in rows]
        with torch.inference_mode():
            audio = compat.audio_embeddings(self.thinker, features, mask)
            embed = compat.text_model(self.thinker).embed_tokens
            embeds, used = [], 0
            for ids in prompts:
                row = embed(ids)
                places = ids == self.audio_id
                count = int(places.sum())
                row[places] = audio[used : used + count].to(row.dtype)
                embeds.append(row)
                used += count
        return prompts, embeds

    def _features(self, samples: list[np.ndarray], texts: list[str] | None = None) -> dict:
        """The processor's inputs for clips with their chat texts (default: the captioner's prompt)."""
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
