"""acecap compare on the tiny model: identical sides agree exactly; fp32 against bf16 gives figures that follow
from the tokens and logits it dumps."""

import json
import os
import warnings

import numpy as np
import pytest
import soundfile
import torch
from conftest import run_acecap
from PIL import Image

from acecap import Decoding
from acecap.compare import Side, builtin_suite, choose_sides, compare, parse_side
from acecap.fidelity import semantic_similarities, word_similarity
from acecap.records import ANNOTATIONS


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def test_sides_parse():
    assert parse_side("cpu:fp32") == Side("cpu", "fp32")
    assert parse_side("npu:0:bf16") == Side("npu:0", "bf16")
    assert parse_side("cuda:1") == Side("cuda:1", "auto")
    assert parse_side("auto") == Side("auto", "auto")
    with pytest.raises(ValueError, match="DEVICE:DTYPE"):
        parse_side(":bf16")
    with pytest.raises(ValueError, match="'bf17' is neither a dtype .* nor a quantization"):
        parse_side("cpu:bf17")  # a typo, not a device index


def test_the_suite_holds_what_it_says():
    clips = {clip.source: clip for clip in builtin_suite(long_seconds=20)}
    names = ["sawtooth-5s", "tone-440hz", "tone-1khz", "chords", "drums", "noise", "near-silence", "long-20s"]
    assert list(clips) == names
    assert clips["sawtooth-5s"].duration == 5.0 and clips["long-20s"].duration == 20.0
    assert np.abs(clips["near-silence"].samples).max() < 1e-3


def test_identical_sides_agree_exactly(tiny_model):
    clips = builtin_suite(long_seconds=20)[::3]
    side = Side("cpu", "fp32")
    results, _ = compare(tiny_model, side, side, clips, Decoding(max_new_tokens=8))
    for result in results:
        generation, forced = result["generation"], result["teacher_forced"]
        assert generation["exact_match"] and generation["first_divergence"] is None
        assert generation["token_match_rate"] == generation["character_similarity"] == 1.0
        assert generation["semantic_similarity"] == 1.0
        assert (forced["kl_max"], forced["top1_agreement"], forced["perplexity_ratio"]) == (0.0, 1.0, 1.0)
        assert all(layer["cosine"] == 1.0 and layer["max_abs"] == 0.0 for layer in result["layers"])
        assert {layer["verdict"] for layer in result["layers"]} == {"pass"}


@pytest.mark.slow
def test_layer_verdicts_are_the_same_whichever_side_is_the_reference(tiny_model):
    clips = builtin_suite()[:1]
    fp32, bf16 = Side("cpu", "fp32"), Side("cpu", "bf16")
    verdicts = []
    for reference, candidate in ((fp32, bf16), (bf16, fp32)):
        [result], _ = compare(tiny_model, reference, candidate, clips, Decoding(max_new_tokens=4))
        verdicts.append([layer["verdict"] for layer in result["layers"]])
    assert verdicts[0] == verdicts[1] and "pass" in verdicts[0]  # bf16's error is judged relative either way


@pytest.mark.slow
def test_fp32_against_bf16_report_follows_from_its_dump(tiny_model, tmp_path):
    out = tmp_path / "precision"
    done = run_acecap("compare", "--model", str(tiny_model), "--ref", "cpu:fp32", "--cand", "cpu:bf16",
                      "--max-new-tokens", "12", "--save-logits", "-o", str(out))  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    assert "verdict: " in done.stderr and "(cpu:bf16 against cpu:fp32)" in done.stderr
    document = json.loads((out / "precision_results.json").read_text())
    logits = np.load(out / "logits.npz")
    assert len(document["clips"]) == 8
    kls = []
    for i, clip in enumerate(document["clips"]):
        ref_ids, cand_ids = clip["generation"]["reference_ids"], clip["generation"]["candidate_ids"]
        ref, cand = logits[f"{i}.reference"].astype(np.float64), logits[f"{i}.candidate"].astype(np.float64)
        assert ref.shape == cand.shape == (len(ref_ids), ref.shape[1])
        # Recomputed here with numpy: log-softmax, KL(ref || cand), top-1, perplexity on the reference's tokens.
        log_ref, log_cand = log_softmax(ref), log_softmax(cand)
        kl = np.maximum((np.exp(log_ref) * (log_ref - log_cand)).sum(1), 0.0)
        forced = clip["teacher_forced"]
        assert forced["kl_per_step"] == pytest.approx(kl.tolist(), rel=1e-6, abs=1e-12)
        assert forced["kl_max"] == pytest.approx(kl.max(), rel=1e-6)
        assert forced["top1_agreement"] == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))
        rows = np.arange(len(ref_ids))
        ratio = np.exp(-log_cand[rows, ref_ids].mean() + log_ref[rows, ref_ids].mean())
        assert forced["perplexity_ratio"] == pytest.approx(ratio, rel=1e-9)
        # The reference's logits, fed its own tokens, pick those tokens again (greedy): positions line up.
        assert ref.argmax(1).tolist() == ref_ids
        same = sum(a == b for a, b in zip(ref_ids, cand_ids, strict=False))
        assert clip["generation"]["token_match_rate"] == same / len(ref_ids)
        assert clip["generation"]["exact_match"] == (ref_ids == cand_ids)
        kls.append(kl.max())
        cosines = [layer["cosine"] for layer in clip["layers"]]
        assert all(0.99 < c < 1.0 for c in cosines)  # bf16: close, never identical
    assert min(kls) > 0  # non-trivial: bf16 moves every clip's distributions
    report = (out / "report.md").read_text()
    assert document["summary"] in report and "| encoder.0 |" in report and "| llm.0 |" in report
    for plot in ("layer_cosine.png", "kl_per_step.png"):
        with Image.open(out / plot) as image:
            assert image.size[0] > 500 and image.size[1] > 300


@pytest.mark.slow
def test_two_saved_runs_compare_by_text(tiny_model, audio_dir, tmp_path):
    files = [str(audio_dir / "tone.wav"), str(audio_dir / "stereo24.wav")]
    for name, dtype in (("fp32", "fp32"), ("bf16", "bf16")):
        done = run_acecap("caption", *files, "--model", str(tiny_model), "--device", "cpu", "--dtype", dtype,
                          "--max-new-tokens", "12", "-f", "jsonl", "-o", str(tmp_path / name))  # fmt: skip
        assert done.returncode == 0, done.stderr
    reference, candidate = tmp_path / "fp32" / "caption.jsonl", tmp_path / "bf16" / "caption.jsonl"
    out = tmp_path / "report"
    done = run_acecap("compare", str(reference), str(candidate), "-o", str(out))
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "precision_results.json").read_text())
    texts = {json.loads(line)["source"]: json.loads(line)["text"] for line in reference.read_text().splitlines()}
    others = {json.loads(line)["source"]: json.loads(line)["text"] for line in candidate.read_text().splitlines()}
    assert [clip["clip"] for clip in document["clips"]] == ["tone.wav (caption)", "stereo24.wav (caption)"]
    for clip, source in zip(document["clips"], files, strict=True):
        generation = clip["generation"]
        assert (generation["reference_text"], generation["candidate_text"]) == (texts[source], others[source])
        assert generation["exact_match"] == (texts[source] == others[source])
        assert generation["word_similarity"] == word_similarity(texts[source], others[source])
        [semantic] = semantic_similarities([(texts[source], others[source])])
        assert generation["semantic_similarity"] == pytest.approx(semantic, abs=1e-6)
    assert "texts identical" in done.stderr
    mismatched = run_acecap("compare", str(reference), "-o", str(out))
    assert mismatched.returncode == 2 and "exactly two result files" in mismatched.stderr


@pytest.mark.slow
def test_two_annotate_runs_compare_by_text(tiny_model, tmp_path):
    """The README's example: two annotate runs' annotations.jsonl, lyrics records too, two files of one name."""
    from acecap.annotate import Job, annotate

    songs = tmp_path / "songs"
    for folder, seconds in (("a", 2.0), ("b", 3.0)):
        (songs / folder).mkdir(parents=True)
        t = np.arange(int(seconds * 16000)) / 16000
        soundfile.write(songs / folder / "song.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    for name, dtype in (("laptop", "fp32"), ("server", "bf16")):
        for task in ("caption", "lyrics"):
            job = Job(inputs=[str(songs)], output_dir=tmp_path / name, model=str(tiny_model), task=task,
                      devices=["cpu"], dtype=dtype, decoding=Decoding(max_new_tokens=6))  # fmt: skip
            assert annotate(job, progress=False).ok
    out = tmp_path / "report"
    done = run_acecap("compare", str(tmp_path / "laptop" / ANNOTATIONS), str(tmp_path / "server" / ANNOTATIONS),
                      "-o", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"report: {out / 'report.md'}" in done.stderr and "texts identical" in done.stderr
    assert done.stdout == ""  # the report is a file, not a page of output
    document = json.loads((out / "precision_results.json").read_text())
    names = [clip["clip"] for clip in document["clips"]]
    assert sorted(names) == [
        "a/song.wav (caption)",
        "a/song.wav (lyrics)",
        "b/song.wav (caption)",
        "b/song.wav (lyrics)",
    ]
    laptop = {(r["path"], r["task"]): r for r in map(json.loads, (tmp_path / "laptop" / ANNOTATIONS).open())}
    assert {r["root"] for r in laptop.values()} == {"songs"}  # paths under the input folder, as stored
    for clip in document["clips"]:
        name, task = clip["clip"].split(" (")
        record = laptop[(name, task.rstrip(")"))]
        expected = record["caption"] if record["task"] == "caption" else record["raw_lyrics"]
        assert clip["generation"]["reference_text"] == expected


def test_saved_runs_pair_each_file_with_itself_and_say_what_one_run_failed_or_lacks(tmp_path):
    """Records written by hand as annotate writes them, on two machines with other folders: a file of one name
    in two folders, failures on either side, a meta record (no model wrote it), a file only one run has."""

    def run(root: str, texts: dict[tuple[str, str], str | None]) -> list[dict]:
        records = [{"path": f"{root}/{name}", "task": task, task: text, "error": None if text else "cannot decode"}
                   for (name, task), text in texts.items()]  # fmt: skip
        return records + [{"path": f"{root}/d.wav", "task": "meta", "meta": "120 BPM, D minor, 4/4", "error": None}]

    laptop = run("/home/me/songs", {("a/song.wav", "caption"): "A caption", ("b/song.wav", "caption"): None,
                                    ("c.wav", "caption"): "Same.", ("d.wav", "caption"): "Reference words.",
                                    ("a/song.wav", "lyrics"): "[verse] la"})  # fmt: skip
    server = run(
        "/data/x/songs",
        {
            ("a/song.wav", "caption"): None,
            ("b/song.wav", "caption"): "B caption",
            ("c.wav", "caption"): "Same.",
            ("d.wav", "caption"): "Other words.",
            ("a/song.wav", "lyrics"): "[verse] la",
            ("e.wav", "caption"): "Only here.",
        },
    )
    for name, records in (("laptop.jsonl", laptop), ("server.jsonl", server)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    done = run_acecap("compare", str(tmp_path / "laptop.jsonl"), str(tmp_path / "server.jsonl"), "-o", str(out))
    assert done.returncode == 1, done.stderr  # the candidate failed a file the reference captioned
    document = json.loads((out / "precision_results.json").read_text())
    compared = {c["clip"]: (c["generation"]["reference_text"], c["generation"]["candidate_text"])
                for c in document["clips"]}  # fmt: skip
    assert compared == {"c.wav (caption)": ("Same.", "Same."), "d.wav (caption)": ("Reference words.", "Other words."),
                        "a/song.wav (lyrics)": ("[verse] la", "[verse] la")}  # fmt: skip
    assert {m["clip"]: (m["reference_error"], m["candidate_error"]) for m in document["not_compared"]} == {
        "a/song.wav (caption)": (None, "cannot decode"),
        "b/song.wav (caption)": ("cannot decode", None),
        "e.wav (caption)": ("not in this run", None),
    }
    assert "2/3 texts identical" in done.stderr and "3 not compared (1 failed in the candidate only)" in done.stderr
    assert "| a/song.wav (caption) | ok | cannot decode |" in (out / "report.md").read_text()


def test_default_sides_never_compare_a_side_with_itself():
    assert choose_sides("cpu:fp32", "cpu:bf16") == (Side("cpu", "fp32"), Side("cpu", "bf16"))
    if not torch.cuda.is_available():  # this host's best device is the CPU: bf16 there is what to measure
        assert choose_sides() == (Side("cpu", "fp32"), Side("cpu", "bf16"))
    with pytest.raises(ValueError, match="both sides are cpu:fp32"):
        choose_sides("cpu:fp32", "cpu:fp32")
    with pytest.raises(ValueError, match="both sides are cpu:bf16"):
        choose_sides("cpu:bf16", "cpu:bf16")


def test_plots_draw_any_file_name(tiny_model, tmp_path):
    from acecap.audio import Clip
    from acecap.plotting import _drawable_codepoints, label
    from acecap.precision_report import write_report

    assert label("song 1.wav") == "song 1.wav"
    assert all(ord(ch) in _drawable_codepoints() or ch.isspace() for ch in label("曲 🎵 ümlaut.wav"))
    clip = builtin_suite(long_seconds=20)[0]
    named = Clip(clip.samples, "曲 🎵 ümlaut.wav")
    undecodable = Clip(clip.samples, os.fsdecode(b"bad_\xffname.wav"))  # not UTF-8: held as a lone surrogate
    sides = Side("cpu", "fp32"), Side("cpu", "bf16")
    results, runs = compare(tiny_model, *sides, [named, undecodable], Decoding(max_new_tokens=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(results, Side("cpu", "fp32"), Side("cpu", "bf16"), runs, tmp_path)
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert "曲 🎵 ümlaut.wav" in (tmp_path / "report.md").read_text()  # the report keeps the name itself
    document = json.loads((tmp_path / "precision_results.json").read_bytes().decode("utf-8"))  # valid UTF-8
    assert [c["clip"] for c in document["clips"]] == [named.source, undecodable.source]  # the same name back
    for plot in ("layer_cosine.png", "kl_per_step.png"):
        with Image.open(tmp_path / plot) as image:
            assert image.size[0] > 500


def test_a_quantized_side_keeps_its_quantization():
    assert choose_sides("cpu:fp32", "cpu:bf16:int8") == (Side("cpu", "fp32"), Side("cpu", "bf16", "int8"))
    assert choose_sides("cpu:fp32", "cpu:auto:int8")[1] == Side("cpu", "bf16", "int8")  # auto: bf16 when quantized
    assert choose_sides("cpu:bf16", "cpu:bf16:int8")[1].quant == "int8"  # not the reference itself
