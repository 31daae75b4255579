"""Packed prefill and continuous batching on the tiny model in fp32: every clip gets the tokens it gets alone."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from acecap import Captioner, Decoding
from acecap.audio import Clip
from acecap.decode import Decoder, pack
from acecap.engine import stream


def noise_clips(seconds: list[float], seed: int = 0) -> list[Clip]:
    rng = np.random.default_rng(seed)
    noise = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    return [Clip(samples, f"clip{i}") for i, samples in enumerate(noise)]


@pytest.fixture(scope="module")
def captioner(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model, device="cpu")


STREAM_SECONDS = [2.0, 5.0, 1.0, 3.5, 0.8, 4.2, 2.7, 1.9, 6.0, 0.5, 3.1, 2.2]


@pytest.fixture(scope="module")
def ending(tiny_model) -> Captioner:
    """The tiny model with its end token's output row scaled up: its captions end by themselves, after 2 to
    30 tokens depending on the clip, as a real model's do (random weights alone never end). Each transformers
    line draws other random weights, so the scale is the one of a few that spreads the endings most."""
    captioner = Captioner.from_pretrained(tiny_model, device="cpu")
    end_row = captioner.thinker.lm_head.weight[captioner.end_ids[0]]
    original, clips = end_row.detach().clone(), noise_clips(STREAM_SECONDS, seed=1)

    def endings(scale: float) -> int:
        with torch.no_grad():
            end_row.copy_(original * scale)
        return len({captioner.caption_clips([clip], Decoding(max_new_tokens=30))[0].tokens for clip in clips})

    endings(max((3.0, 3.5, 4.0, 5.0, 6.0), key=endings))
    return captioner


def test_prompts_are_packed_into_full_passes_in_order():
    assert pack([5, 3, 9], budget=8) == [[(0, 0, 5), (1, 0, 3)], [(2, 0, 8)], [(2, 8, 9)]]
    assert pack([20], budget=8) == [[(0, 0, 8)], [(0, 8, 16)], [(0, 16, 20)]]
    assert pack([2, 2], budget=100) == [[(0, 0, 2), (1, 0, 2)]]
    # Apart (the CPU's way): a prompt never shares a pass, and a long one still continues across passes.
    assert pack([5, 3, 9], budget=8, together=False) == [[(0, 0, 5)], [(1, 0, 3)], [(2, 0, 8)], [(2, 8, 9)]]
    with pytest.raises(ValueError):
        pack([1], budget=0)


@pytest.mark.parametrize("budget", [100_000, 101, 7])
def test_packed_prefill_equals_clip_by_clip(captioner, budget):
    """One packed pass, prompts split across passes, and passes of a few tokens: same logits and caches."""
    clips = noise_clips([3.0, 1.2, 7.5, 0.5])
    prompts = captioner._prompts([(clip.samples, captioner.chat_text) for clip in clips])
    capacities = sorted(len(ids) + 4 for ids, _ in prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
    with torch.inference_mode():
        packed = Decoder(captioner.thinker, capacities, pack_prompts=True)  # as on an accelerator
        logits = packed.prefill(list(range(len(order))), [prompts[i][1] for i in order], budget)
        for row, i in enumerate(order):
            alone = Decoder(captioner.thinker, [capacities[row]], pack_prompts=False)
            expected = alone.prefill([0], [prompts[i][1]])[0]
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
            tokens = len(prompts[i][0])
            for layer in range(len(packed.layers)):
                ours = _row_cache(packed, packed.keys[layer], row)[:, :tokens]
                theirs = _row_cache(alone, alone.keys[layer], 0)[:, :tokens]
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _row_cache(decoder: Decoder, cache: torch.Tensor, row: int) -> torch.Tensor:
    start, end, capacity, offset = next(g for g in decoder.groups if g[0] <= row < g[1])
    size = decoder.kv_heads * capacity * decoder.head_dim
    at = offset + (row - start) * size
    return cache[at : at + size].view(decoder.kv_heads, capacity, decoder.head_dim)


def test_batched_prefill_gives_the_tokens_of_clip_by_clip(tiny_model):
    clips = noise_clips([3.0, 7.5, 1.2, 12.0, 0.3])
    decoding = Decoding(max_new_tokens=16)
    small_passes = Captioner.from_pretrained(tiny_model, device="cpu", prefill_tokens=37)
    batched = [(r.text, r.tokens, r.prompt_tokens) for r in small_passes.caption_clips(clips, decoding)]
    alone = [small_passes.caption_clips([clip], decoding)[0] for clip in clips]
    assert batched == [(r.text, r.tokens, r.prompt_tokens) for r in alone]


def test_stream_gives_each_clip_its_tokens_alone_and_keeps_the_rows_full(ending):
    clips = noise_clips(STREAM_SECONDS, seed=1)
    decoding = Decoding(max_new_tokens=30)
    alone = {clip.source: ending.caption_clips([clip], decoding)[0] for clip in clips}
    assert len({r.tokens for r in alone.values()}) > 4, "clips should end after different numbers of tokens"
    streamed = []
    results = dict(ending.caption_stream(((c.source, c) for c in clips), decoding, rows=3,
                                         on_token=lambda key, token: streamed.append((key, token))))  # fmt: skip
    assert set(results) == set(alone)
    for source, result in results.items():
        expected = alone[source]
        assert (result.text, result.tokens, result.finished, result.prompt_tokens) == (
            expected.text, expected.tokens, expected.finished, expected.prompt_tokens,
        )  # fmt: skip
        assert result.source == source and result.duration == expected.duration
        assert [token for key, token in streamed if key == source] == _tokens(ending, clips, source, decoding)
    # Rows are refilled as clips end: every step runs three rows until no clip waits, then the last ones drain
    # (batches of three would each shrink to their longest caption and jump back to three for the next).
    active = []
    pendings = [ending._pending(i, clip, decoding, 300.0, ending.prompt) for i, clip in enumerate(clips)]
    list(stream(lambda caps: ending._wave(caps, decoding), pendings, ending.end_ids, ending.device, rows=3,
                on_step=lambda pairs: active.append(len(pairs))))  # fmt: skip
    assert active[0] == 3 and active == sorted(active, reverse=True)
    assert sum(active) == sum(r.tokens for r in alone.values())
    assert active.count(3) >= sum(r.tokens for r in alone.values()) // 3 - max(r.tokens for r in alone.values())


def _tokens(captioner: Captioner, clips: list[Clip], source: str, decoding: Decoding) -> list[int]:
    steps = []
    clip = next(c for c in clips if c.source == source)
    result = captioner.caption_clips([clip], decoding, on_step=steps.append)[0]
    return [step[0] for step in steps][: result.tokens]


@pytest.mark.parametrize("rows", [4, 2])
def test_a_clip_that_cannot_be_captioned_fails_alone(ending, rows):
    """In the first wave (4 rows), or in a refill beside a clip already decoding (2 rows): that one is run
    again alone, from its audio, and gets the tokens it gets alone."""
    clips = noise_clips([2.0, 1.0, 3.0, 2.5, 1.5])
    clips.append(Clip(np.zeros(0, dtype=np.float32), "empty"))  # no audio: its prompt cannot be built
    decoding = Decoding(max_new_tokens=12)
    results = dict(ending.caption_stream(((c.source, c) for c in clips), decoding, rows=rows))
    assert results["empty"] == "ValueError: no audio samples to caption"
    for clip in clips:
        if clip.source != "empty":
            assert results[clip.source].text == ending.caption_clips([clip], decoding)[0].text


def test_a_stopped_stream_finishes_the_clips_on_the_device_and_starts_no_more(captioner):
    """What Ctrl-C in annotate does: the first wave's two clips end whole; the four waiting never start."""
    clips = noise_clips([1.0, 2.0, 1.5, 3.0, 2.5, 1.2])
    decoding = Decoding(max_new_tokens=6)
    stopped = threading.Event()
    items = ((c.source, c) for c in clips)
    outcomes = captioner.caption_stream(items, decoding, rows=2, on_token=lambda *_: stopped.set(), stop=stopped.is_set)
    results = dict(outcomes)
    assert len(results) == 2
    for clip in clips:
        if clip.source in results:
            alone = captioner.caption_clips([clip], decoding)[0]
            assert (results[clip.source].text, results[clip.source].tokens) == (alone.text, alone.tokens)


def test_the_streams_iterator_failing_is_the_callers_error(captioner):
    def items():
        yield "a", noise_clips([1.0])[0]
        raise OSError("the input went away")

    with pytest.raises(OSError, match="went away"):
        list(captioner.caption_stream(items(), Decoding(max_new_tokens=2), rows=2))


OUT_OF_MEMORY_STREAM = """
import json, resource, sys
import numpy as np
from acecap import Captioner, Decoding
from acecap.audio import Clip

def vm(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) * 1024

# One prefill pass for the whole batch, so that the batch's memory grows with its clips.
captioner = Captioner.from_pretrained(sys.argv[1], device="cpu", prefill_tokens=10**6)
clips = [Clip((np.random.default_rng(i).standard_normal(16000 * 300) * 0.1).astype(np.float32), str(i))
         for i in range(16)]
decoding = Decoding(max_new_tokens=3)
alone = [captioner.caption_clips([clip], decoding)[0].text for clip in clips]
before = vm("VmSize")
captioner.caption_clips(clips, decoding)
sixteen = vm("VmPeak") - before
resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + sixteen // 2, resource.RLIM_INFINITY))
results = dict(captioner.caption_stream(((c.source, c) for c in clips), decoding, rows=16))
print(json.dumps({"alone": alone, "stream": [results[c.source] if isinstance(results[c.source], str)
                                              else results[c.source].text for c in clips]}))
"""


@pytest.mark.slow
def test_out_of_memory_halves_the_rows_and_loses_nothing(tiny_model):
    """A real allocation failure (address space capped), not a simulated one."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), MALLOC_ARENA_MAX="1")
    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_STREAM, str(tiny_model)],
                            capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["stream"] == outcome["alone"]
    assert "out of memory with 16 clips in the batch; going on with at most 8" in result.stderr
