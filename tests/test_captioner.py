import logging
import math

import numpy as np
import pytest

from acecap import Captioner, Decoding
from acecap.audio import to_clip
from acecap.model import TASKS


@pytest.fixture(scope="module")
def captioner(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model, device="cpu")


def sawtooth(seconds: float, rate: int = 16000) -> np.ndarray:
    """The seed's test clip: a 5 s sawtooth at 16 kHz."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * (2 * ((t * 220) % 1) - 1)).astype(np.float32)


@pytest.mark.slow
def test_result_is_generated_text_with_its_figures(captioner):
    result = captioner.caption(sawtooth(5), Decoding(max_new_tokens=12), sample_rate=16000)
    assert result.text and "Describe this audio" not in result.text and "assistant" not in result.text
    assert 1 <= result.tokens <= 12
    assert (result.model, result.device, result.dtype, result.task) == (
        str(captioner.model_name),
        "cpu",
        "fp32",
        "caption",
    )
    assert result.prompt == TASKS["caption"].prompt
    assert result.duration == 5.0 and not result.truncated
    t = result.timings
    assert t.load_s > 0 and 0 < t.first_token_s < t.total_s and t.decode_tokens_per_s > 0


@pytest.mark.parametrize("limit", [3, 40])
def test_max_new_tokens_is_honoured_when_the_model_would_go_on(captioner, limit):
    # ignore_eos forces long outputs: without the limit, generation would run to the thinker's default 1024.
    result = captioner.caption(sawtooth(2), Decoding(max_new_tokens=limit, ignore_eos=True), sample_rate=16000)
    assert result.tokens == limit and not result.finished


def test_greedy_is_deterministic_and_the_default(captioner):
    first = captioner.caption(sawtooth(2), Decoding(max_new_tokens=10), sample_rate=16000)
    second = captioner.caption(sawtooth(2), Decoding(max_new_tokens=10), sample_rate=16000)
    assert first.text == second.text and Decoding().temperature == 0


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(captioner):
    options = Decoding(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    first = captioner.caption(sawtooth(2), options, sample_rate=16000)
    second = captioner.caption(sawtooth(2), options, sample_rate=16000)
    greedy = captioner.caption(sawtooth(2), Decoding(max_new_tokens=10, ignore_eos=True), sample_rate=16000)
    assert first.text == second.text != greedy.text


def test_long_audio_is_truncated_with_a_flag_and_a_warning(captioner, caplog):
    with caplog.at_level(logging.WARNING, logger="acecap"):
        result = captioner.caption(sawtooth(4), Decoding(max_new_tokens=2), sample_rate=16000, max_duration=1.5)
    assert result.truncated and result.duration == 4.0 and result.captioned_seconds == 1.5
    assert "4.0 s long; captioning the first" in caplog.text


def test_max_duration_is_bounded_by_the_context(captioner):
    decoding = Decoding(max_new_tokens=512)
    limit = captioner.max_duration_limit(decoding)
    assert 1250 < limit < 1300  # (32768 - prompt - 512) / 25 tokens per second
    with pytest.raises(ValueError, match="max duration must be in"):
        captioner.caption(sawtooth(1), decoding, sample_rate=16000, max_duration=limit + 1)


@pytest.mark.slow
def test_past_300_s_audio_goes_through_when_allowed(captioner):
    result = captioner.caption(sawtooth(301), Decoding(max_new_tokens=2), sample_rate=16000, max_duration=310)
    assert not result.truncated and result.captioned_seconds == 301


def test_a_batch_gives_each_clip_its_own_caption(captioner):
    clips = [to_clip(sawtooth(3), 16000, "a"), to_clip(sawtooth(1.3), 16000, "b")]
    batch = captioner.caption_clips(clips, Decoding(max_new_tokens=8))
    alone = [captioner.caption_clips([clip], Decoding(max_new_tokens=8))[0] for clip in clips]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.source for r in batch] == ["a", "b"]


def test_array_needs_a_sample_rate(captioner):
    with pytest.raises(ValueError, match="sample_rate"):
        captioner.caption(sawtooth(1))


@pytest.mark.slow
def test_audio_encoder_rows_do_not_depend_on_the_batch(captioner):
    """Clips across 32 s piece boundaries (acecap encodes in pieces on 4.57) in one batch get the rows
    the library's own encoder call gives each alone."""
    import torch

    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(16000 * s)).astype(np.float32) * 0.1 for s in (1.0, 31.9, 32.0, 70.0, 3.0)]
    features = [captioner._features([clip]) for clip in clips]
    with torch.inference_mode():
        outputs = [
            captioner.thinker.get_audio_features(
                f["input_features"], feature_attention_mask=f["feature_attention_mask"]
            )
            for f in features
        ]
        alone = [getattr(out, "last_hidden_state", out) for out in outputs]  # 4.57 returns the tensor
        prompts = captioner._prompts([(clip, captioner.chat_text) for clip in clips])
    for (_, clip_embeds), rows, f in zip(prompts, alone, features, strict=True):
        places = f["input_ids"][0] == captioner.audio_id
        assert int(places.sum()) == len(rows)
        torch.testing.assert_close(clip_embeds[places], rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["static", "transformers"])
def test_on_step_streams_each_rows_tokens(tiny_model, decoder):
    captioner = Captioner.from_pretrained(tiny_model, device="cpu", decoder=decoder)
    clips = [to_clip(sawtooth(seconds), 16000) for seconds in (1, 3)]
    steps = []
    results = captioner.caption_clips(clips, Decoding(max_new_tokens=6), on_step=steps.append)
    assert all(len(step) == 2 for step in steps) and len(steps) == max(r.tokens for r in results)
    for row, result in enumerate(results):
        streamed = [step[row] for step in steps][: result.tokens]
        assert captioner.processor.tokenizer.decode(streamed, skip_special_tokens=True).strip() == result.text


def test_a_prompt_holding_the_audio_placeholder_is_refused(captioner):
    """Its placeholder would be read as text beside the real audio: the clip gets a clear error instead."""
    clip = to_clip(np.full(16_000, 0.1, np.float32), 16_000)
    with pytest.raises(ValueError, match="must not contain the audio placeholder"):
        captioner.caption_clips([clip], Decoding(max_new_tokens=2), prompts=["Describe <|AUDIO|> in detail"])
    assert captioner.caption_clips([clip], Decoding(max_new_tokens=2), prompts=["Describe it"])[0].tokens == 2


@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": 2.5},
        {"max_new_tokens": True},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": math.nan},
        {"repetition_penalty": math.nan},
        {"repetition_penalty": math.inf},
    ],
)
def test_decoding_refuses_values_no_decoder_can_use(options):
    """NaN compares false with every bound, so checks written as `< 0` let it through to the kernels."""
    with pytest.raises(ValueError, match="must be"):
        Decoding(**options)
    assert Decoding(max_new_tokens=np.int64(8)).max_new_tokens == 8  # a count from numpy is a whole number


def test_empty_batches_and_rowless_streams(captioner):
    assert captioner.caption_clips([]) == []
    with pytest.raises(ValueError, match="rows must be at least 1"):
        list(captioner.caption_stream([], rows=0))
