"""Waves: one decoder's rows on the device, filled with clips, advanced a token at a time, rows freed as clips
end. StaticWave packs prompts into prefill passes over a static cache and steps all rows at once (rows can be
filled again); PaddedWave is transformers' generate() over one left-padded batch, the reference path.
engine.py schedules clips into waves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import devices
from .decode import PREFILL_TOKENS, Decoder, GraphedStep, pick
from .generate import Decoding, generate


@dataclass(eq=False)
class Pending:
    """A clip waiting for a row: what the caller calls it, the cache slots it needs, and its input."""

    key: Any
    need: int  # prompt tokens + new tokens
    seconds: float  # audio captioned, for messages
    payload: Any  # what the wave's prepare turns into a prompt (kept while the clip is on the device: a retry needs it)


@dataclass(eq=False)
class Row:
    """A clip in a row of a wave, and what it has generated so far."""

    pending: Pending
    started: float  # when its prefill (features and encoder included) began, on the host clock
    first: float = 0.0  # when its first token's logits existed
    ended: float = 0.0  # when its last token was picked
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)


@dataclass
class Finished:
    """One clip's generated tokens (end token included when reached) and its timings."""

    key: Any
    tokens: list[int]
    finished: bool  # the model ended the text itself (False: max_new_tokens cut it)
    prompt_tokens: int
    first_token_s: float  # features, encoder and prefill of the clips prefilled with it
    total_s: float  # from its prefill's start to its last token
    decode_tokens_per_s: float


class Wave(Protocol):
    """A batch of rows on the device: filled with clips, advanced a token at a time, rows freed as clips end."""

    capacities: list[int]  # per row: the largest need it can take (0: the wave cannot be refilled)
    rows: dict[int, Row]  # the occupied rows

    def fill(self, assignments: list[tuple[int, Pending]]) -> None: ...

    def advance(self, on_step: Callable[[list[tuple[Any, int]]], None] | None) -> list[Row]: ...


def finished_of(row: Row, end_ids: list[int]) -> Finished:
    tokens = row.tokens
    decode_s = row.ended - row.first
    return Finished(
        key=row.pending.key,
        tokens=tokens,
        finished=bool(tokens) and tokens[-1] in end_ids,
        prompt_tokens=row.prompt_tokens,
        first_token_s=row.first - row.started,
        total_s=row.ended - row.started,
        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
    )


class StaticWave:
    """Rows of a static-cache Decoder: prompts packed into prefill passes, one decode step for all rows."""

    def __init__(
        self,
        thinker,
        capacities: list[int],
        decoding: Decoding,
        end_ids: list[int],
        kind: str,
        prepare: Callable[[list[Any]], list[tuple[torch.Tensor, torch.Tensor]]],
        prefill_tokens: int = PREFILL_TOKENS,
    ):
        """`prepare(payloads)`: each clip's prompt token ids and input embeddings, on the device."""
        device = thinker.device
        self.device, self.decoding, self.end_ids = device, decoding, end_ids
        self.prepare, self.prefill_tokens = prepare, prefill_tokens
        backend = devices.compiler(device)[0] if kind == "compiled" else None
        # On CUDA the compiled step is captured too: fused kernels, and no launches left to pay for.
        self.graphs = kind == "graphs" or (kind == "compiled" and device.type == "cuda")
        self.decoder = Decoder(thinker, capacities, backend)
        self.capacities = self.decoder.capacities
        count = len(capacities)
        vocab = thinker.lm_head.out_features
        self.rows: dict[int, Row] = {}
        self.lengths = torch.zeros(count, dtype=torch.long, device=device)  # free rows sit at slot 0
        self.active = torch.zeros(count, dtype=torch.long, device=device)
        self.logits = torch.zeros(count, vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(count, vocab, dtype=torch.bool, device=device)
        self.ends = torch.tensor(end_ids, device=device)
        self.generator = None
        if decoding.temperature > 0:
            self.generator = torch.Generator(device=device)
            if decoding.seed is None:
                self.generator.seed()  # a new generator's state is a constant: unseeded, every sample would be one
            else:
                self.generator.manual_seed(decoding.seed)
        self.graphed: GraphedStep | None = None

    def fill(self, assignments: list[tuple[int, Pending]]) -> None:
        """Prefill clips into free rows, in groups of at most `prefill_tokens` prompt tokens, so that features,
        encoder activations and embeddings never exist for more than one group at once."""
        started = devices.now(self.device)
        for row, pending in assignments:
            self.rows[row] = Row(pending, started)
        groups, current, tokens = [], [], 0
        for row, pending in assignments:
            prompt = pending.need - self.decoding.max_new_tokens
            if current and tokens + prompt > self.prefill_tokens:
                groups.append(current)
                current, tokens = [], 0
            current.append((row, pending))
            tokens += prompt
        groups.append(current)
        with torch.inference_mode():
            for group in groups:
                rows = [row for row, _ in group]
                prompts = self.prepare([pending.payload for _, pending in group])
                logits = self.decoder.prefill(rows, [embeds for _, embeds in prompts], self.prefill_tokens)
                index = torch.tensor(rows, device=self.device)
                self.logits[index] = logits
                self.lengths[index] = torch.tensor([len(ids) for ids, _ in prompts], device=self.device)
                self.active[index] = 1
                self.seen[index] = False
                if self.decoding.repetition_penalty != 1.0:
                    for row, (ids, _) in zip(rows, prompts, strict=True):
                        self.seen[row, ids] = True
                for row, (ids, _) in zip(rows, prompts, strict=True):
                    self.rows[row].prompt_tokens = len(ids)
        first = devices.now(self.device)
        for row, _ in assignments:
            self.rows[row].first = first

    def advance(self, on_step: Callable[[list[tuple[Any, int]]], None] | None) -> list[Row]:
        """Pick each occupied row's next token and feed it; the rows that ended with it, now free.

        Ended rows leave the wave only once the step is launched: if it fails, they count as in flight.
        """
        with torch.inference_mode():
            if self.decoding.ignore_eos:
                self.logits[:, self.ends] = float("-inf")
            tokens = pick(self.logits, self.decoding, self.seen, self.generator)
            picked = tokens.tolist()
            now = time.perf_counter()
            ended, pairs = [], []
            for index, row in self.rows.items():
                token = picked[index]
                row.tokens.append(token)
                pairs.append((row.pending.key, token))
                if token in self.end_ids or len(row.tokens) == self.decoding.max_new_tokens:
                    row.ended = now
                    ended.append(index)
            if on_step is not None:
                on_step(pairs)
            if ended:
                index = torch.tensor(ended, device=self.device)
                self.lengths[index] = 0
                self.active[index] = 0
            if len(ended) < len(self.rows):
                if self.decoding.repetition_penalty != 1.0:
                    self.seen[torch.arange(len(picked), device=self.device), tokens] = True
                if self.graphs:
                    self.graphed = self.graphed or GraphedStep(self.decoder, tokens, self.lengths)
                    logits = self.graphed(tokens, self.lengths)
                else:
                    logits = self.decoder.step(tokens, self.lengths)
                self.logits.copy_(logits)
                self.lengths += self.active
        return [self.rows.pop(index) for index in ended]


class PaddedWave:
    """transformers' generate() over one left-padded batch: the reference path, a wave no row of which
    can be filled again (capacity 0)."""

    def __init__(self, thinker, count: int, decoding: Decoding, end_ids: list[int], pad_id: int, prepare):
        """`prepare(payloads)`: the processor's inputs for the batch, padded."""
        self.thinker, self.decoding, self.end_ids, self.pad_id = thinker, decoding, end_ids, pad_id
        self.prepare = prepare
        self.capacities = [0] * count
        self.rows: dict[int, Row] = {}
        self.inputs: dict = {}

    def fill(self, assignments: list[tuple[int, Pending]]) -> None:
        started = devices.now(self.thinker.device)
        for row, pending in assignments:
            self.rows[row] = Row(pending, started)
        order = sorted(self.rows)
        self.inputs = self.prepare([self.rows[row].pending.payload for row in order])
        for row, count in zip(order, self.inputs["attention_mask"].sum(dim=1).tolist(), strict=True):
            self.rows[row].prompt_tokens = int(count)

    def advance(self, on_step: Callable[[list[tuple[Any, int]]], None] | None) -> list[Row]:
        """The whole batch, generated to its end in one call."""
        order = sorted(self.rows)
        keys = [self.rows[row].pending.key for row in order]
        step = None if on_step is None else lambda tokens: on_step(list(zip(keys, tokens, strict=True)))
        generated = generate(self.thinker, self.inputs, self.decoding, self.end_ids, self.pad_id, step)
        for row, tokens in zip(order, generated.tokens, strict=True):
            self.rows[row].tokens = tokens
            self.rows[row].first = self.rows[row].started + generated.first_token_s
            self.rows[row].ended = self.rows[row].started + generated.total_s
        self.inputs = {}
        return [self.rows.pop(row) for row in order]


def generate_prompts(
    thinker, prompts: list[tuple[torch.Tensor, torch.Tensor]], decoding: Decoding, end_ids: list[int]
) -> list[Finished]:
    """Greedy or sampled tokens for prompts already embedded (token ids, embeddings), one static wave."""
    pendings = [Pending(i, len(prompt[0]) + decoding.max_new_tokens, 0.0, prompt) for i, prompt in enumerate(prompts)]
    wave = StaticWave(thinker, sorted(p.need for p in pendings), decoding, end_ids, "static", lambda given: given)
    return run_wave(wave, pendings, end_ids)


def run_wave(wave: Wave, pendings: list[Pending], end_ids: list[int], on_step=None) -> list[Finished]:
    """Every clip in its own row of one wave, run to the end; errors propagate. Results in the clips' order."""
    order = sorted(range(len(pendings)), key=lambda i: pendings[i].need)  # rows ascend in capacity
    wave.fill([(row, pendings[i]) for row, i in enumerate(order)])
    finished: dict[int, Finished] = {}
    keys = {id(p): i for i, p in enumerate(pendings)}
    while wave.rows:
        for row in wave.advance(on_step):
            finished[keys[id(row.pending)]] = finished_of(row, end_ids)
    return [finished[i] for i in range(len(pendings))]
