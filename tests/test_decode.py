"""The static-cache decoder against transformers' own generate(), on the tiny model."""

import logging

import numpy as np
import pytest
import torch

from acecap import Captioner, Decoding
from acecap.audio import Clip
from acecap.decode import choose_decoder, length_groups, pick
from acecap.devices import choose_compiler


def noise_clips(seconds: list[float]) -> list[Clip]:
    rng = np.random.default_rng(0)
    return [Clip((0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32), f"{s}s") for s in seconds]


@pytest.fixture(scope="module")
def pair(tiny_model) -> tuple[Captioner, Captioner]:
    static = Captioner.from_pretrained(tiny_model, device="cpu", decoder="static")
    reference = Captioner(
        static.thinker, static.processor, task="caption", prompt=static.prompt, model_name="tiny", load_s=0.0,
        decoder="transformers",
    )  # fmt: skip
    return static, reference


@pytest.mark.parametrize(
    "decoding",
    [Decoding(max_new_tokens=24), Decoding(max_new_tokens=24, repetition_penalty=1.3), Decoding(max_new_tokens=9)],
)
def test_static_decoder_gives_the_tokens_of_transformers_generate(pair, decoding):
    static, reference = pair
    clips = noise_clips([3.0, 7.5, 1.2, 12.0])  # different lengths: padded rows for generate(), none here
    ours = static.caption_clips(clips, decoding)
    theirs = reference.caption_clips(clips, decoding)
    assert [(r.text, r.tokens, r.finished) for r in ours] == [(r.text, r.tokens, r.finished) for r in theirs]
    assert all(r.tokens == decoding.max_new_tokens for r in ours)  # random weights never end by themselves


@pytest.mark.slow
def test_compiled_decoder_gives_the_tokens_of_the_eager_one(pair):
    static, _ = pair
    compiled = Captioner(
        static.thinker, static.processor, task="caption", prompt=static.prompt, model_name="tiny", load_s=0.0,
        decoder="compiled",
    )  # fmt: skip
    decoding = Decoding(max_new_tokens=24)
    # Three length groups, then a layout of one row: the compiled step must serve both.
    for seconds in ([3.0, 7.5, 1.2, 12.0, 30.0], [4.0]):
        clips = noise_clips(seconds)
        ours = compiled.caption_clips(clips, decoding)
        eager = static.caption_clips(clips, decoding)
        assert [(r.text, r.tokens) for r in ours] == [(r.text, r.tokens) for r in eager]
    # Another batch of other lengths, rows and groups reuses the compiled step: the layout is data to it.
    clips = noise_clips([2.0, 20.0, 5.0, 9.0, 1.0, 14.0, 6.5])
    with torch._dynamo.config.patch(error_on_recompile=True):
        ours = compiled.caption_clips(clips, decoding)
        # So do continuous batching's waves, whose rows are refilled and sit free (at slot 0) between clips.
        streamed = dict(compiled.caption_stream(((c.source, c) for c in clips), Decoding(max_new_tokens=9), rows=3))
    assert [r.text for r in ours] == [r.text for r in static.caption_clips(clips, decoding)]
    alone = {c.source: static.caption_clips([c], Decoding(max_new_tokens=9))[0].text for c in clips}
    assert {source: result.text for source, result in streamed.items()} == alone


def test_prefill_logits_match_the_thinker_forward(pair):
    from acecap.decode import Decoder

    static, _ = pair
    samples = noise_clips([4.0])[0].samples
    inputs = static._features([samples])
    ((ids, embeds),) = static._prompts([(samples, static.chat_text)])
    assert ids.tolist() == inputs["input_ids"][0].tolist()  # the processor's prompt, placeholders expanded
    with torch.inference_mode():
        expected = static.thinker(**inputs).logits[0, -1]
        ours = Decoder(static.thinker, [len(ids) + 4]).prefill([0], [embeds])[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy(pair):
    static, _ = pair
    clips = noise_clips([2.0, 5.0])
    sampled = Decoding(max_new_tokens=16, temperature=1.0, seed=7)
    first, second = (static.caption_clips(clips, sampled) for _ in range(2))
    assert [r.text for r in first] == [r.text for r in second]
    greedy = static.caption_clips(clips, Decoding(max_new_tokens=16))
    narrow = static.caption_clips(clips, Decoding(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1))
    assert [r.text for r in narrow] == [r.text for r in greedy]
    assert [r.text for r in first] != [r.text for r in greedy]


def test_pick_applies_the_repetition_penalty_like_transformers():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    # 2.0 / 2 = 1.0 falls below 1.5; -1.0 * 2 = -2.0 stays last.
    assert pick(logits, Decoding(repetition_penalty=2.0), seen, None).tolist() == [1]
    assert pick(logits, Decoding(), seen, None).tolist() == [0]


def test_rows_share_a_cache_only_with_rows_of_similar_length():
    assert length_groups([100, 110, 125, 126, 400, 410, 3000]) == [(0, 3), (3, 4), (4, 6), (6, 7)]
    assert length_groups([50]) == [(0, 1)]
    assert length_groups([7, 7, 7]) == [(0, 3)]


def test_decoder_choice(caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert choose_decoder("auto", cpu) == "static"
    assert choose_decoder("auto", cuda) == "graphs"
    assert choose_decoder("transformers", cuda) == "transformers"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_decoder("graphs", cpu)
    with pytest.raises(ValueError, match="unknown decoder"):
        choose_decoder("fast", cpu)
    assert choose_decoder("compiled", cpu) == "compiled"
    with caplog.at_level(logging.WARNING, logger="acecap"):
        assert choose_decoder("compiled", torch.device("mps")) == "static"
    assert "decoding eagerly (static) on mps" in caplog.text


def test_compiler_choice_per_device():
    assert choose_compiler("cpu", torchair_installed=False) == ("inductor", "")
    assert choose_compiler("cuda", torchair_installed=False) == ("inductor", "")
    assert choose_compiler("npu", torchair_installed=True) == ("torchair", "")
    backend, reason = choose_compiler("npu", torchair_installed=False)
    assert backend is None and "torchair" in reason and "not installed" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_tokens_of_the_eager_decoders(tiny_model):
    clips = noise_clips([3.0, 7.5, 1.2, 12.0])
    decoding = Decoding(max_new_tokens=24)
    texts = {}
    for decoder in ("graphs", "compiled", "static", "transformers"):
        captioner = Captioner.from_pretrained(tiny_model, device="cuda", dtype="fp32", decoder=decoder)
        texts[decoder] = [r.text for r in captioner.caption_clips(clips, decoding)]
        assert [r.text for r in captioner.caption_clips(clips[:1], decoding)] == texts[decoder][:1]
    assert texts["graphs"] == texts["compiled"] == texts["static"] == texts["transformers"]
