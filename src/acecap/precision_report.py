"""The files `acecap compare` writes: precision_results.json, report.md and two plots, and the verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .writers import atomic_write, to_json

ABSENT = "not in this run"  # a saved run's reason for a text it does not have

VERDICTS = ("pass", "warn", "fail")


def verdict(results: list[dict]) -> str:
    """The worst layer verdict over every clip."""
    worst = max((VERDICTS.index(layer["verdict"]) for r in results for layer in r["layers"]), default=0)
    return VERDICTS[worst]


def write_report(results: list[dict], reference, candidate, runs: dict, output_dir: Path,
                 save_logits: bool = False) -> str:  # fmt: skip
    """precision_results.json, report.md, layer_cosine.png and kl_per_step.png; returns the verdict line."""
    output_dir.mkdir(parents=True, exist_ok=True)
    overall = verdict(results)
    identical = sum(r["generation"]["exact_match"] for r in results)
    failing = next(((r["clip"], r["first_failing_layer"]) for r in results if r["first_failing_layer"]), None)
    agreement = min(r["teacher_forced"]["top1_agreement"] for r in results)
    kl = max(r["teacher_forced"]["kl_max"] for r in results)
    line = (
        f"verdict: {overall.upper()} ({candidate} against {reference}): {identical}/{len(results)} clips generate "
        f"identical tokens; teacher-forced top-1 agreement ≥ {agreement:.1%}, KL ≤ {kl:.2e} nats"
        + (f"; first failing layer {failing[1]} (clip {failing[0]})" if failing else "")
    )
    document = {"schema": 1, "reference": str(reference), "candidate": str(candidate), "verdict": overall,
                "summary": line, "clips": results}  # fmt: skip
    atomic_write(output_dir / "precision_results.json", to_json(document, indent=2) + "\n")  # any file name
    if save_logits:
        arrays = {}
        for i, r in enumerate(results):
            ref, cand = runs[r["clip"]]
            arrays[f"{i}.reference"], arrays[f"{i}.candidate"] = ref.logits.numpy(), cand.logits.numpy()
        np.savez_compressed(output_dir / "logits.npz", **arrays)
    _plots(results, output_dir)
    atomic_write(output_dir / "report.md", _readable(_markdown(results, line) + "\n"))
    return line


def _readable(text: str) -> bytes:
    """UTF-8 for people: a file name's undecodable bytes (lone surrogates) shown as \\udcXX escapes."""
    return text.encode("utf-8", errors="backslashreplace")


def _markdown(results: list[dict], line: str) -> str:
    rows = [f"# Precision: {line}", "", "## Generation (generated tokens only)", "",
            "| clip | identical | token match | first divergence (step: ref → cand, each in the other's top 5) "
            "| character similarity | word similarity | semantic similarity | tokens ref / cand |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        g, d = r["generation"], r["generation"]["first_divergence"]
        where = "—" if d is None else f"{d['step']}: {d['reference_token']} → {d['candidate_token']}"
        if d and "candidate_token_in_reference_top5" in d:
            where += f" ({d['candidate_token_in_reference_top5']}, {d['reference_token_in_candidate_top5']})"
        rows.append(f"| {r['clip']} | {g['exact_match']} | {g['token_match_rate']:.1%} | {where} | "
                    f"{g['character_similarity']:.3f} | {g['word_similarity']:.3f} | {_semantic(g)} | "
                    f"{g['reference_tokens']} / {g['candidate_tokens']} |")  # fmt: skip
    rows += ["", "## Teacher-forced on the reference's tokens", "",
             "| clip | top-1 agreement | KL mean / p99 / max (nats) | perplexity ratio (cand / ref) |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        t = r["teacher_forced"]
        rows.append(f"| {r['clip']} | {t['top1_agreement']:.1%} | {t['kl_mean']:.2e} / {t['kl_p99']:.2e} / "
                    f"{t['kl_max']:.2e} | {t['perplexity_ratio']:.4f} |")  # fmt: skip
    rows += ["", "## Layers (worst clip per layer)", "", "| layer | cosine (min) | max abs error | max relative error "
             "| verdict |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for i, layer in enumerate(results[0]["layers"]):
        worst = [r["layers"][i] for r in results]
        rank = max(VERDICTS.index(w["verdict"]) for w in worst)
        rows.append(f"| {layer['name']} | {min(w['cosine'] for w in worst):.6f} | "
                    f"{max(w['max_abs'] for w in worst):.2e} | {max(w['max_relative'] for w in worst):.2e} | "
                    f"{VERDICTS[rank]} |")  # fmt: skip
    rows += _captions(results)
    return "\n".join(rows)


def _captions(results: list[dict]) -> list[str]:
    rows = ["", "## Captions", ""]
    for r in results:
        rows += [f"**{r['clip']}**", "", f"- reference: {r['generation']['reference_text']}",
                 f"- candidate: {r['generation']['candidate_text']}", ""]  # fmt: skip
    return rows


def _semantic(generation: dict) -> str:
    value = generation["semantic_similarity"]
    return "— (pip install acecap[semantic])" if value is None else f"{value:.3f}"


def _plots(results: list[dict], output_dir: Path) -> None:
    from . import plotting

    pyplot = plotting.pyplot()
    figure, towers = pyplot.subplots(1, 2, figsize=(11, 4))
    for axes, prefix, title in ((towers[0], "encoder.", "audio encoder"), (towers[1], "llm.", "language model")):
        for r in results:
            cosines = [layer["cosine"] for layer in r["layers"] if layer["name"].startswith(prefix)]
            axes.plot(range(len(cosines)), cosines, marker=".", label=plotting.label(r["clip"]))
        axes.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
        axes.set(title=f"{title}: cosine per layer", xlabel="layer", ylabel="cosine similarity")
        axes.xaxis.get_major_locator().set_params(integer=True)
    towers[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output_dir / "layer_cosine.png", dpi=100)
    pyplot.close(figure)
    figure, axes = pyplot.subplots(figsize=(7, 4))
    for r in results:
        axes.plot(r["teacher_forced"]["kl_per_step"], label=plotting.label(r["clip"]))
    axes.set(title="KL(reference ‖ candidate) per generated step", xlabel="step", ylabel="KL (nats)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(output_dir / "kl_per_step.png", dpi=100)
    pyplot.close(figure)


def failed_in_candidate(missing: list[dict]) -> int:
    """Of the texts two saved runs could not compare, those the reference wrote and the candidate failed."""
    return sum(m["reference_error"] is None and m["candidate_error"] != ABSENT for m in missing)


def write_text_report(results: list[dict], missing: list[dict], reference: Path, candidate: Path,
                      output_dir: Path) -> str:  # fmt: skip
    """Two saved runs: texts only, so no verdict beyond how many match, and which texts one run lacks."""
    output_dir.mkdir(parents=True, exist_ok=True)
    identical = sum(r["generation"]["exact_match"] for r in results)
    mean = sum(r["generation"]["character_similarity"] for r in results) / len(results)
    line = (f"{identical}/{len(results)} texts identical ({candidate} against {reference}); "
            f"mean character similarity {mean:.3f}")  # fmt: skip
    if missing:
        line += f"; {len(missing)} not compared ({failed_in_candidate(missing)} failed in the candidate only)"
    document = {"schema": 1, "reference": str(reference), "candidate": str(candidate), "verdict": None,
                "summary": line, "clips": results, "not_compared": missing}  # fmt: skip
    atomic_write(output_dir / "precision_results.json", to_json(document, indent=2) + "\n")  # any file name
    rows = [f"# Precision: {line}", "", "Saved runs hold texts, not tokens or logits: text-level metrics only.", "",
            "| file | identical | character similarity | word similarity | semantic similarity |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        g = r["generation"]
        similarity = f"{g['character_similarity']:.3f} | {g['word_similarity']:.3f} | {_semantic(g)}"
        rows.append(f"| {r['clip']} | {g['exact_match']} | {similarity} |")
    if missing:
        rows += ["", "## Not compared", "", "| file | reference | candidate |", "| --- | --- | --- |"]
        rows += [f"| {m['clip']} | {m['reference_error'] or 'ok'} | {m['candidate_error'] or 'ok'} |" for m in missing]
    rows += _captions(results)
    atomic_write(output_dir / "report.md", _readable("\n".join(rows) + "\n"))
    return line
