"""`acecap compare`: one model on two device:dtype sides, the same clips, and how far apart they land.

The reference side runs first and is unloaded before the candidate loads, so the two never share memory.
Each side generates greedily on its own; then both are fed the reference's tokens (teacher forcing) so
their next-token distributions and every layer's hidden states can be compared on the same inputs.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import compat, devices
from .audio import SAMPLE_RATE, Clip
from .captioner import DEFAULT_MAX_DURATION, Captioner
from .fidelity import (
    character_similarity,
    first_divergence,
    first_failing,
    layer_fidelity,
    semantic_similarities,
    teacher_forced,
    token_match_rate,
    word_similarity,
)
from .generate import Decoding
from .hub import resolve_model
from .model import TASKS, resident_bytes
from .precision_report import ABSENT
from .quant import QUANTS
from .waves import generate_prompts


@dataclass(frozen=True)
class Side:
    device: str
    dtype: str
    quant: str = "none"

    def __str__(self) -> str:
        return f"{self.device}:{self.dtype}" + (f":{self.quant}" if self.quant != "none" else "")


def parse_side(text: str) -> Side:
    """DEVICE[:DTYPE][:QUANT]: `cpu:fp32`, `npu:0:bf16`, `cuda:bf16:int4`, `cpu:bf16:int8` (dtype defaults to
    auto, quantization to none)."""
    parts = text.strip().split(":")
    quant = parts.pop() if len(parts) > 1 and parts[-1] in QUANTS else "none"
    dtype = parts.pop() if len(parts) > 1 and (parts[-1] in devices.DTYPES or parts[-1] == "auto") else "auto"
    if len(parts) > 1 and not parts[-1].isdigit():  # only a card's index may follow the device
        raise ValueError(f"bad side {text!r}: {parts[-1]!r} is neither a dtype ({', '.join(devices.DTYPES)}, auto) "
                         f"nor a quantization ({', '.join(q for q in QUANTS if q != 'none')})")  # fmt: skip
    device = ":".join(parts)
    if not device or device in QUANTS or device in devices.DTYPES:
        raise ValueError(f"bad side {text!r}: use DEVICE:DTYPE or DEVICE:DTYPE:QUANT, like cpu:fp32 or cuda:bf16:int4")
    return Side(device, dtype, quant)


DEFAULT_REFERENCE, DEFAULT_CANDIDATE = "cpu:fp32", "auto:auto"


def resolve_side(side: Side) -> Side:
    """The side as it will run, `auto` made concrete (bf16 where quantized, as Captioner.from_pretrained does),
    so that reports name what ran."""
    device = devices.resolve_device(side.device)
    dtype = "bf16" if side.dtype == "auto" and side.quant != "none" else side.dtype
    return Side(str(device), devices.dtype_name(devices.resolve_dtype(dtype, device)), side.quant)


def choose_sides(reference: str = DEFAULT_REFERENCE, candidate: str = DEFAULT_CANDIDATE) -> tuple[Side, Side]:
    """Both sides, resolved. Where the default candidate is the reference itself (a host with no accelerator),
    the candidate becomes bf16 on that device: what half precision costs there, not a comparison with itself."""
    ref, cand = resolve_side(parse_side(reference)), resolve_side(parse_side(candidate))
    if cand == ref and candidate == DEFAULT_CANDIDATE and ref.dtype == "fp32":
        cand = Side(ref.device, "bf16", ref.quant)
    if cand == ref:
        raise ValueError(f"both sides are {ref}: a model compared with itself agrees by construction; give --cand "
                         "another device, dtype or quantization (cpu:bf16, npu:0:bf16, cpu:bf16:int8)")  # fmt: skip
    return ref, cand


def builtin_suite(long_seconds: float = 60.0) -> list[Clip]:
    """Clips made on the fly: the seed's 5 s sawtooth, two pure tones, a chord progression, a drum loop,
    noise, near-silence and a long clip of all of them."""
    rate = SAMPLE_RATE
    rng = np.random.default_rng(0)

    def t(seconds: float) -> np.ndarray:
        return np.arange(int(seconds * rate)) / rate

    def chord(frequencies: list[float], seconds: float) -> np.ndarray:
        return sum(np.sin(2 * np.pi * f * t(seconds)) for f in frequencies) / len(frequencies)

    sawtooth = 0.5 * (2 * ((t(5) * 220) % 1) - 1)
    progression = np.concatenate([chord(c, 2.0) for c in ([261.6, 329.6, 392.0], [349.2, 440.0, 523.3],
                                                           [392.0, 493.9, 587.3], [261.6, 329.6, 392.0])])  # fmt: skip
    beat = np.zeros(int(0.5 * rate))
    kick = np.sin(2 * np.pi * 60 * t(0.15)) * np.exp(-t(0.15) * 30)
    beat[: len(kick)] += kick
    hat = rng.standard_normal(int(0.05 * rate)) * np.exp(-t(0.05) * 80) * 0.3
    beat[int(0.25 * rate) : int(0.25 * rate) + len(hat)] += hat
    drums = np.tile(beat, 16)
    clips = {
        "sawtooth-5s": sawtooth,
        "tone-440hz": 0.3 * np.sin(2 * np.pi * 440 * t(3)),
        "tone-1khz": 0.3 * np.sin(2 * np.pi * 1000 * t(3)),
        "chords": 0.3 * progression,
        "drums": 0.5 * drums,
        "noise": 0.1 * rng.standard_normal(5 * rate),
        "near-silence": 1e-4 * rng.standard_normal(5 * rate),
    }
    mix = np.concatenate(list(clips.values()))
    clips[f"long-{long_seconds:g}s"] = np.tile(mix, int(np.ceil(long_seconds * rate / len(mix))))[
        : int(long_seconds * rate)
    ]
    return [Clip(samples.astype(np.float32), name) for name, samples in clips.items()]


@dataclass
class SideRun:
    """What one side produced for one clip."""

    tokens: list[int]  # generated, end token included when reached
    text: str
    logits: torch.Tensor  # (reference tokens, vocab), fp32 on the CPU: teacher-forced on the reference's tokens
    layers: dict[str, torch.Tensor]  # hidden states per layer, encoder then language model, fp32 on the CPU


def _encoder_layers(captioner: Captioner, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The prompt's ids and embeddings, and each audio-encoder layer's output on this clip."""
    tower = compat.thinker_parts(captioner.thinker).audio_tower
    outputs: list[list[torch.Tensor]] = [[] for _ in tower.layers]
    ((ids, embeds),) = captioner._prompts([(samples, captioner.chat_text)], layer_outputs=outputs)
    return ids, embeds, [torch.cat(parts).float().cpu() for parts in outputs]


def run_side(captioner: Captioner, clip: Clip, decoding: Decoding, forced: list[int] | None) -> SideRun:
    """Generate for one clip, then feed `forced` (the reference's tokens; None: this side's own)."""
    samples = clip.samples[: int(DEFAULT_MAX_DURATION * SAMPLE_RATE)]
    with torch.inference_mode():
        prompt, embeds, encoder = _encoder_layers(captioner, samples)
        tokens = generate_prompts(captioner.thinker, [(prompt, embeds)], decoding, captioner.end_ids)[0].tokens
        forced = tokens if forced is None else forced
        text_model = compat.text_model(captioner.thinker)
        fed = torch.tensor(forced[:-1], dtype=torch.long, device=embeds.device)
        sequence = torch.cat([embeds, text_model.embed_tokens(fed)])[None]
        out = text_model(inputs_embeds=sequence, output_hidden_states=True)
        logits = captioner.thinker.lm_head(out.last_hidden_state[0, len(prompt) - 1 :]).float().cpu()
    layers = {f"encoder.{i}": hidden for i, hidden in enumerate(encoder)}
    # hidden_states[0] is the embeddings; [i + 1] is layer i's output (the last one after the final norm).
    for i, hidden in enumerate(out.hidden_states[1:]):
        layers[f"llm.{i}"] = hidden[0].float().cpu()
    text = captioner.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return SideRun(tokens=tokens, text=text, logits=logits, layers=layers)


def text_metrics(reference: str, candidate: str) -> dict:
    """What two texts alone can show: exact match and character and word similarity, with both texts."""
    return {
        "exact_match": reference == candidate,
        "character_similarity": character_similarity(reference, candidate),
        "word_similarity": word_similarity(reference, candidate),
        "reference_text": reference,
        "candidate_text": candidate,
    }


def clip_metrics(reference: SideRun, candidate: SideRun, half_precision: bool) -> dict:
    """Every metric for one clip, as plain JSON values."""
    ref, cand = reference.tokens, candidate.tokens
    step = first_divergence(ref, cand)
    divergence = None
    if step is not None and step < min(len(ref), len(cand)):
        ref_top5 = reference.logits[step].topk(5).indices.tolist()
        cand_top5 = candidate.logits[step].topk(5).indices.tolist()
        divergence = {
            "step": step,
            "reference_token": ref[step],
            "candidate_token": cand[step],
            "candidate_token_in_reference_top5": cand[step] in ref_top5,
            "reference_token_in_candidate_top5": ref[step] in cand_top5,
        }
    elif step is not None:  # one side stopped here; the other's next token
        divergence = {"step": step, "reference_token": ref[step] if step < len(ref) else None,
                      "candidate_token": cand[step] if step < len(cand) else None}  # fmt: skip
    forced = teacher_forced(reference.logits, candidate.logits, ref)
    layers = [layer_fidelity(name, reference.layers[name], candidate.layers[name], half_precision)
              for name in reference.layers]  # fmt: skip
    return {
        "generation": {
            **text_metrics(reference.text, candidate.text),
            "exact_match": ref == cand,
            "token_match_rate": token_match_rate(ref, cand),
            "first_divergence": divergence,
            "reference_tokens": len(ref),
            "candidate_tokens": len(cand),
            "reference_ids": ref,
            "candidate_ids": cand,
        },
        "teacher_forced": {
            "top1_agreement": forced.top1_agreement,
            "kl_mean": forced.kl_mean,
            "kl_p99": forced.kl_p99,
            "kl_max": forced.kl_max,
            "perplexity_ratio": forced.perplexity_ratio,
            "kl_per_step": forced.kl_per_step,
        },
        "layers": [layer.__dict__ for layer in layers],
        "first_failing_layer": first_failing(layers),
    }


def _load(model, side: Side, task: str, hub: str) -> Captioner:
    return Captioner.from_pretrained(
        model, task=task, device=side.device, dtype=side.dtype, hub=hub, decoder="static", quant=side.quant
    )


def compare(model, reference: Side, candidate: Side, clips: list[Clip], decoding: Decoding,
            task: str = "caption", hub: str = "auto") -> tuple[list[dict], dict]:  # fmt: skip
    """Both sides over the clips, one loaded at a time: each clip's metrics, and the runs themselves."""
    captioner = _load(model, reference, task, hub)
    references = {clip.source: run_side(captioner, clip, decoding, None) for clip in clips}
    device, half = captioner.device, captioner.dtype in (torch.bfloat16, torch.float16)
    del captioner
    gc.collect()
    devices.empty_cache(device)  # the candidate may load onto the same card
    captioner = _load(model, candidate, task, hub)
    half |= captioner.dtype in (torch.bfloat16, torch.float16)  # either side: a verdict the same both ways round
    runs, results = {}, []
    for clip in clips:
        ref = references[clip.source]
        cand = run_side(captioner, clip, decoding, ref.tokens)
        runs[clip.source] = (ref, cand)
        results.append({"clip": clip.source, "seconds": clip.duration, **clip_metrics(ref, cand, half)})
    add_semantic(results)
    return results, runs


def add_semantic(results: list[dict]) -> None:
    """Each clip's `semantic_similarity` of the two texts, None without the `semantic` extra."""
    pairs = [(r["generation"]["reference_text"], r["generation"]["candidate_text"]) for r in results]
    similarities = semantic_similarities(pairs) or [None] * len(results)
    for result, similarity in zip(results, similarities, strict=True):
        result["generation"]["semantic_similarity"] = similarity


def check_both_fit(model, reference: Side, candidate: Side, task: str = "caption", hub: str = "auto") -> None:
    """Refuse before any work when either side cannot run or its weights cannot fit its device (they load in turn)."""
    from .quant import check

    sides = []
    for side in (reference, candidate):
        device = devices.resolve_device(side.device)
        dtype = devices.resolve_dtype("bf16" if side.quant != "none" and side.dtype == "auto" else side.dtype, device)
        check(side.quant, device, dtype)  # before any download
        sides.append((side, device, dtype))
    folder = resolve_model(str(model or TASKS[task].model_id), hub)
    for side, device, dtype in sides:
        try:
            devices.check_fits(resident_bytes(folder, side.quant, dtype, device.type), device, dtype, quant=side.quant)
        except devices.DeviceError as error:
            raise devices.DeviceError(
                f"{side}: {error}. Compare against results saved elsewhere (acecap compare A.json B.json), "
                f"or bf16 against fp32 on a device where both fit"
            ) from None


def record_text(record: dict) -> str | None:
    """What the model wrote, in any record acecap saves: `caption -f json/jsonl` keeps it under `text`;
    annotate under the task's name (for lyrics the model's own text, before parsing, is `raw_lyrics`)."""
    for key in ("text", "raw_lyrics", record.get("task") or "caption"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def unique_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest tail of folder names that no other path shares (song.wav, or a/song.wav)."""
    parts = {path: Path(path).parts for path in paths}
    names = {}
    for path, own in parts.items():
        for depth in range(1, len(own) + 1):
            tail = own[-depth:]
            if all(other[-depth:] != tail for key, other in parts.items() if key != path):
                break
        names[path] = "/".join(tail)
    return names


def read_results(path: Path) -> list[dict]:
    """The model's records of a caption or annotate run (a .json record or list, or .jsonl), the last per file
    and task; meta records (the signal's analysis, no model) are left out."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    latest = {}
    for record in records:
        if isinstance(record, dict) and record.get("task", "caption") != "meta":
            latest[(_file_of(record), record.get("task", "caption"))] = record
    return list(latest.values())


def _file_of(record: dict) -> str:
    """The file a saved record names: caption's `source`; annotate's `path`, under its `root` where it has one."""
    if record.get("root") is not None:
        return f"{record['root']}/{record['path']}"
    return str(record.get("path") or record["source"])


def _common_tail(a: str, b: str) -> int:
    """How many trailing path parts (the file name first) two paths share."""
    count = 0
    for x, y in zip(reversed(Path(a).parts), reversed(Path(b).parts), strict=False):
        if x != y:
            break
        count += 1
    return count


def _key(record: dict) -> tuple[str, str]:
    return Path(_file_of(record)).name, record.get("task", "caption")


Pairs = list[tuple[dict, dict]]


def pair_records(reference: list[dict], candidate: list[dict]) -> tuple[Pairs, list[dict], list[dict]]:
    """Records of the same file and task in two runs, made on machines that may hold other folders: paired by
    file name, a name shared by several files told apart by the most trailing folders each pair shares (and
    left unpaired where that is a tie). (pairs, the reference's unpaired, the candidate's unpaired)."""
    groups: dict[tuple[str, str], tuple[list[dict], list[dict]]] = {}
    for side, records in enumerate((reference, candidate)):
        for record in records:
            groups.setdefault(_key(record), ([], []))[side].append(record)

    def best(record: dict, others: list[dict]) -> dict | None:
        scores = sorted((_common_tail(_file_of(record), _file_of(other)), i) for i, other in enumerate(others))
        if not scores or (len(scores) > 1 and scores[-1][0] == scores[-2][0]):
            return None
        return others[scores[-1][1]]

    pairs = []
    for refs, cands in groups.values():
        for ref in refs:
            cand = best(ref, cands)
            if cand is not None and best(cand, refs) is ref:
                pairs.append((ref, cand))
    paired = {id(r) for pair in pairs for r in pair}
    return pairs, [r for r in reference if id(r) not in paired], [r for r in candidate if id(r) not in paired]


def compare_results(reference: Path, candidate: Path) -> tuple[list[dict], list[dict]]:
    """Text-level metrics for every file and task both runs wrote a text for (saved runs hold text, not tokens
    or logits), and what could not be compared: each text one run failed on or does not have, with why."""
    ref_records, cand_records = read_results(reference), read_results(candidate)
    pairs, only_ref, only_cand = pair_records(ref_records, cand_records)
    names = unique_names([_file_of(r) for r in ref_records])
    names.update({path: name for path, name in unique_names([_file_of(r) for r in cand_records]).items()
                  if path not in names})  # fmt: skip

    def label(record: dict) -> str:
        return f"{names[_file_of(record)]} ({record.get('task', 'caption')})"

    def failure(record: dict) -> str | None:
        if record.get("error") is not None:
            return str(record["error"])
        return None if record_text(record) is not None else "no text"

    results, missing = [], []
    for ref, cand in pairs:
        if failure(ref) is None and failure(cand) is None:
            results.append({"clip": label(ref), "generation": text_metrics(record_text(ref), record_text(cand))})
        else:
            missing.append({"clip": label(ref), "reference_error": failure(ref), "candidate_error": failure(cand)})
    missing += [{"clip": label(r), "reference_error": failure(r), "candidate_error": ABSENT} for r in only_ref]
    missing += [{"clip": label(r), "reference_error": ABSENT, "candidate_error": failure(r)} for r in only_cand]
    if not results:
        raise ValueError(f"{reference} and {candidate} share no file both wrote a text for (records pair up by "
                         "file name)")  # fmt: skip
    add_semantic(results)
    return results, missing
