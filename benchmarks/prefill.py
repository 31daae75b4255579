"""Prefill: several clips packed into one pass against each clip prefilled alone, and, for the attention of
a packed pass, one call per prompt (what acecap does) against one call with a block-diagonal causal mask.

The language model's prefill of embedded prompts only (features and encoder apart), on random weights of a
model shape. Each point is timed once after a warm-up; the packed pass must give the same logits.

    python benchmarks/prefill.py                                   # small shape, CPU, bf16
    python benchmarks/prefill.py --shape tiny --cases 2x2 -o /tmp/p   # smoke run

Writes prefill.json and prefill.md into -o (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from acecap import devices
from acecap.bench import environment
from acecap.compat import text_model
from acecap.decode import PREFILL_TOKENS, Decoder
from acecap.features import audio_tokens, feature_frames
from acecap.tiny import random_thinker

PROMPT_TEXT_TOKENS = 30  # the chat text around the audio


def timed(call, device: torch.device) -> tuple[float, object]:
    call()  # warm-up
    start = devices.now(device)
    out = call()
    return devices.now(device) - start, out


def prefill_case(thinker, clips: int, seconds: float, budget: int) -> dict:
    """Clip by clip against packed, on prompts of `seconds` of audio each (random embeddings)."""
    tokens = PROMPT_TEXT_TOKENS + audio_tokens(feature_frames(int(seconds * 16000)))
    hidden, device = text_model(thinker).config.hidden_size, thinker.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    embeds = [(torch.randn(tokens, hidden, generator=generator) * 0.02).to(device, thinker.dtype) for _ in range(clips)]
    decoder = Decoder(thinker, [tokens + 1] * clips, pack_prompts=True)
    with torch.inference_mode():
        alone_s, alone = timed(
            lambda: torch.cat([decoder.prefill([row], [e], budget) for row, e in enumerate(embeds)]), device
        )
        packed_s, packed = timed(lambda: decoder.prefill(list(range(clips)), embeds, budget), device)
    return {
        "clips": clips,
        "seconds": seconds,
        "prompt_tokens": tokens,
        "clip_by_clip_s": alone_s,
        "packed_s": packed_s,
        "speedup": alone_s / packed_s,
        "max_logit_difference": float((alone - packed).abs().max()),
    }


def attention_case(thinker, clips: int, seconds: float) -> dict:
    """One layer's attention over a packed pass of `clips` prompts: per prompt, or one block-diagonal call."""
    config, device = text_model(thinker).config, thinker.device
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    tokens = PROMPT_TEXT_TOKENS + audio_tokens(feature_frames(int(seconds * 16000)))
    total = clips * tokens
    q = torch.randn(1, heads, total, head_dim, device=device, dtype=thinker.dtype)
    k = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=thinker.dtype)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = torch.randn_like(k)

    def per_prompt():
        spans = [slice(i * tokens, (i + 1) * tokens) for i in range(clips)]
        outs = [F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], is_causal=True) for s in spans]
        return torch.cat(outs, dim=2)

    prompt = torch.arange(total, device=device) // tokens
    slot = torch.arange(total, device=device)
    mask = (prompt[:, None] == prompt[None, :]) & (slot[None, :] <= slot[:, None])

    def block_diagonal():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.inference_mode():
        per_s, ours = timed(per_prompt, device)
        mask_s, theirs = timed(block_diagonal, device)
    return {
        "clips": clips,
        "seconds": seconds,
        "pass_tokens": total,
        "per_prompt_s": per_s,
        "block_diagonal_s": mask_s,
        "ratio": mask_s / per_s,
        "mask_bytes": total * total,
        "max_difference": float((ours.float() - theirs.float()).abs().max()),
    }


def markdown(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"Prefill, {setup['shape']} shape, {setup['device']}, {setup['dtype']}; torch {setup['torch']} "
        f"({setup['machine']}); passes of at most {setup['budget']} tokens.",
        "",
        "| clips × audio | prompt tokens each | clip by clip | packed | speed-up | largest logit difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in report["prefill"]:
        lines.append(
            f"| {case['clips']} × {case['seconds']:g} s | {case['prompt_tokens']} | {case['clip_by_clip_s']:.2f} s | "
            f"{case['packed_s']:.2f} s | {case['speedup']:.2f}× | {case['max_logit_difference']:.1e} |"
        )
    lines += [
        "",
        "| attention of one layer over a pass of | tokens | per prompt | block-diagonal mask | mask / per prompt |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in report["attention"]:
        lines.append(
            f"| {case['clips']} × {case['seconds']:g} s | {case['pass_tokens']} | {case['per_prompt_s'] * 1000:.1f} ms "
            f"| {case['block_diagonal_s'] * 1000:.1f} ms | {case['ratio']:.1f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=["tiny", "small", "7b"], help="random model shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--cases", nargs="+", default=["8x8", "4x30", "2x90"], help="CLIPSxSECONDS (default 8x8 4x30 2x90)"
    )
    parser.add_argument("--budget", type=int, default=PREFILL_TOKENS, help="tokens per packed pass")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    thinker = random_thinker(args.shape, device, dtype)
    cases = [(int(c), float(s)) for c, s in (case.split("x") for case in args.cases)]
    report = {
        "setup": {**environment(device, dtype), "shape": args.shape, "budget": args.budget},
        "prefill": [prefill_case(thinker, clips, seconds, args.budget) for clips, seconds in cases],
        "attention": [attention_case(thinker, clips, seconds) for clips, seconds in cases],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "prefill.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "prefill.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
