"""A batch in, generated tokens and timings out."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from . import devices


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens. Greedy (temperature 0) unless asked otherwise."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # for sampling; greedy needs none
    ignore_eos: bool = False  # decode exactly max_new_tokens, for benchmarks and tests

    def __post_init__(self) -> None:
        # Written so that NaN fails every check: it compares false with everything.
        whole = isinstance(self.max_new_tokens, numbers.Integral) and not isinstance(self.max_new_tokens, bool)
        if not whole or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number of at least 1, not {self.max_new_tokens!r}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a number >= 0, not {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a number > 0, not {self.repetition_penalty!r}")


@dataclass
class Generated:
    """Tokens of each row (end token included when reached) and the batch's timings."""

    tokens: list[list[int]]
    finished: list[bool]  # True where the model ended the text itself, False where max_new_tokens cut it
    first_token_s: float  # prefill: from the call to the first token's logits
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per stream after the first token."""
        steps = max(len(row) for row in self.tokens) - 1
        decode_s = self.total_s - self.first_token_s
        return steps / decode_s if steps > 0 and decode_s > 0 else 0.0


class _FirstTokenClock(LogitsProcessor):
    """Notes when the first logits exist; generate() calls logits processors once per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = devices.now(self.device)
        return scores


class _StepStreamer(BaseStreamer):
    """Hands each step's new tokens (one per row, pad where a row has ended) to a callback."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def generate(
    model,
    inputs: dict,
    decoding: Decoding,
    end_ids: list[int],
    pad_id: int,
    on_step: Callable[[list[int]], None] | None = None,
) -> Generated:
    """Run the thinker's generate on one prepared batch (left-padded) and cut each row at its end token."""
    device = model.device
    clock = _FirstTokenClock(device)
    options = {
        "max_new_tokens": decoding.max_new_tokens,
        "eos_token_id": end_ids,
        "pad_token_id": pad_id,
        "logits_processor": LogitsProcessorList([clock]),
        "repetition_penalty": decoding.repetition_penalty,
        "do_sample": decoding.temperature > 0,
    }
    if decoding.temperature > 0:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
    if decoding.ignore_eos:
        options["min_new_tokens"] = decoding.max_new_tokens
    if on_step is not None:
        options["streamer"] = _StepStreamer(on_step)
    prompt_length = inputs["input_ids"].shape[1]
    start = devices.now(device)
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    end = devices.now(device)
    rows, finished = [], []
    for row in output[:, prompt_length:].tolist():
        stop = next((i for i, token in enumerate(row) if token in end_ids), None)
        finished.append(stop is not None)
        rows.append(row if stop is None else row[: stop + 1])
    first = (clock.at if clock.at is not None else end) - start
    return Generated(tokens=rows, finished=finished, first_token_s=first, total_s=end - start)
