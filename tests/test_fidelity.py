"""The fidelity metrics on examples worked out by hand."""

import math

import pytest
import torch

from acecap.fidelity import (
    character_similarity,
    first_divergence,
    first_failing,
    layer_fidelity,
    semantic_similarities,
    teacher_forced,
    token_match_rate,
    word_similarity,
)


def test_token_metrics():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # the shorter side ends first
    assert token_match_rate([1, 2, 3, 4], [1, 5, 3]) == 0.5  # 2 of the reference's 4 positions
    assert token_match_rate([1, 2], [1, 2, 7, 7]) == 1.0
    assert token_match_rate([], []) == 1.0


def test_texts_that_differ_in_one_word():
    a, b = "a bright acoustic ballad", "a dark acoustic ballad"
    # Words: one substitution out of four.
    assert word_similarity(a, b) == 0.75
    # Characters, 24 and 22: " acoustic ballad" (16), then "a " (2) before it, then "r" in bright/dark.
    assert character_similarity(a, b) == pytest.approx(2 * (16 + 2 + 1) / (24 + 22))
    assert character_similarity(a, a) == 1.0
    assert word_similarity("one two three", "one three") == pytest.approx(2 / 3)  # one deletion
    assert word_similarity("", "") == 1.0


def test_teacher_forced_by_hand():
    # Step 0: the same distribution. Step 1: reference (0.5, 0.5), candidate (0.25, 0.75).
    ref = torch.log(torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    cand = torch.log(torch.tensor([[0.9, 0.1], [0.25, 0.75]]))
    tokens = [0, 1]
    result = teacher_forced(ref, cand, tokens)
    kl_step1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert result.kl_per_step == pytest.approx([0.0, kl_step1])
    assert result.kl_max == pytest.approx(kl_step1)
    assert result.kl_mean == pytest.approx(kl_step1 / 2)
    # argmax: step 0 both 0; step 1 reference ties to 0, candidate 1.
    assert result.top1_agreement == 0.5
    # NLL of tokens (0, 1): reference -(ln .9 + ln .5)/2, candidate -(ln .9 + ln .75)/2.
    assert result.perplexity_ratio == pytest.approx(math.exp((math.log(0.5) - math.log(0.75)) / 2))
    same = teacher_forced(ref, ref.clone(), tokens)
    assert (same.kl_max, same.top1_agreement, same.perplexity_ratio) == (0.0, 1.0, 1.0)


def test_layer_verdicts():
    ref = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    nudge = torch.tensor([0.0, 0.0, 0.0, 0.01], dtype=torch.float64)
    assert layer_fidelity("same", ref, ref.clone(), half_precision=False).verdict == "pass"
    same = layer_fidelity("same", ref, ref.clone(), half_precision=False)
    assert (same.cosine, same.max_abs, same.max_relative) == (1.0, 0.0, 0.0)
    off = layer_fidelity("off", ref, ref + nudge, half_precision=False)
    assert off.max_abs == pytest.approx(0.01) and off.verdict == "warn"  # cosine fine, error above 1e-3
    assert off.max_relative == pytest.approx(0.01 / 4)
    # The same error against a half-precision candidate is a share of 4: 0.0025 < 2^-6, a pass.
    assert layer_fidelity("off", ref, ref + nudge, half_precision=True).verdict == "pass"
    flipped = layer_fidelity("flipped", ref, -ref, half_precision=True)
    assert flipped.cosine == pytest.approx(-1.0) and flipped.verdict == "fail"
    layers = [same, off, flipped]
    assert first_failing(layers) == "flipped"
    assert first_failing([same, off]) is None


def test_semantic_similarity_ranks_meaning():
    similar = ("a bright acoustic ballad with piano", "a dark acoustic ballad with piano")
    unrelated = ("heavy metal with distorted guitars", "a calm piano lullaby")
    same = ("upbeat synth pop", "upbeat synth pop")
    scores = semantic_similarities([similar, unrelated, same])
    assert scores is not None, "the test extra installs the semantic model"
    assert scores[2] == 1.0
    assert 0.8 < scores[0] < 1.0
    assert scores[1] < 0.5 < scores[0]
