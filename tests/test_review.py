"""acecap review: a real server over a folder annotated with the tiny model, driven by a real headless
Chromium (Playwright on the system's /usr/bin/chromium), and by raw HTTP for every refusal."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from conftest import run_acecap
from test_benchmarks import load_program

from acecap.acestep import export
from acecap.annotate import Job, annotate
from acecap.catalog import FLAGS, STATUSES, Catalog, Query
from acecap.generate import Decoding
from acecap.inputs import discover
from acecap.records import latest_per_input, load_records
from acecap.review import running
from acecap.reviews import append_review, changes, check_fields, export_reviewed, load_reviews

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
FORMATS = ["acestep", "csv", "acestep-dataset"]
EDITED_CAPTION = "A bright sine tone swelling twice a second, no drums, no voice."


def write_songs(folder: Path) -> Path:
    """Three tones of different lengths and formats (one in a subfolder) and an empty file."""
    rate = 44100
    (folder / "sub").mkdir(parents=True)
    for name, frequency, seconds in (("a.wav", 220, 12), ("b.flac", 330, 6), ("sub/c.mp3", 440, 7)):
        t = np.arange(int(seconds * rate)) / rate
        swell = (1 + np.sin(2 * np.pi * 2 * t)) / 2
        soundfile.write(folder / name, (0.3 * swell * np.sin(2 * np.pi * frequency * t)).astype(np.float32), rate)
    (folder / "empty.wav").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(songs, OUT): annotated for caption, lyrics and meta through the Python API, then exported to
    sidecars, dataset.csv and dataset.json as `annotate -f acestep -f csv -f acestep-dataset` does."""
    root = tmp_path_factory.mktemp("review")
    songs, out = write_songs(root / "songs"), root / "labels"
    for task in ("caption", "lyrics", "meta"):
        job = Job([str(songs)], out, task=task, model=str(tiny_model), devices=["cpu"],
                  decoding=Decoding(max_new_tokens=8))  # fmt: skip
        annotate(job, progress=False)
    relative = {os.path.abspath(item.path): item.relative for item in discover([songs])}
    export(latest_per_input(load_records(out)), relative, FORMATS, out)
    return songs, out


def by_name(out: Path) -> dict[str, int]:
    return {entry.shown: entry.id for entry in Catalog(out).entries}


# ---- the browser --------------------------------------------------------------------------------------


def browser_or_skip(playwright):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.mark.slow
def test_review_in_a_browser_edits_reach_the_sidecars_and_survive_annotate(job, tiny_model):
    from playwright.sync_api import expect, sync_playwright

    songs, out = job
    ids = by_name(out)
    with sync_playwright() as playwright, running(out) as url:
        browser = browser_or_skip(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))

        # The table loads, with every file of the records and their flags.
        page.goto(url)
        paths = page.locator("#songs tbody td.path")
        expect(paths).to_have_text(["a.wav", "b.flac", "empty.wav", "sub/c.mp3"])
        expect(page.locator("#counts")).to_have_text("4 files · 0 approved · 0 edited · 4 unreviewed")
        expect(page.locator("#songs tbody tr:has-text('empty.wav') .flag")).to_have_text(["error"])

        # Filters: a flag, a text search, then cleared; the view is kept in the URL.
        page.select_option("select[name=flag]", "error")
        expect(paths).to_have_text(["empty.wav"])
        assert "flag=error" in page.url
        page.select_option("select[name=flag]", "")
        page.fill("input[name=q]", "sub/")
        expect(paths).to_have_text(["sub/c.mp3"])
        page.fill("input[name=q]", "")
        expect(paths).to_have_count(4)
        page.click("th[data-sort=duration]")
        expect(page.locator("th[data-sort=duration]")).to_have_class(re.compile(r"\bsorted\b"))
        expect(paths).to_have_text(["b.flac", "sub/c.mp3", "a.wav", "empty.wav"])  # 6, 7, 12 s; no length last

        # The file view: audio plays (its time advances), and the shortcuts seek by 5 s.
        page.click("a:text-is('a.wav')")
        page.wait_for_url(lambda address: address.endswith(f"/file/{ids['a.wav']}?sort=duration"))
        expect(page.locator("#path")).to_have_text("a.wav")
        expect(page.locator("#position")).to_have_text("3 of 4")
        page.wait_for_function("document.getElementById('audio').readyState >= 1")
        page.keyboard.press("k")
        page.wait_for_function("document.getElementById('audio').currentTime > 0.5", timeout=10_000)
        assert page.evaluate("document.getElementById('audio').paused") is False
        before = page.evaluate("document.getElementById('audio').currentTime")
        page.keyboard.press("l")
        assert page.evaluate("document.getElementById('audio').currentTime") >= before + 4.5
        page.keyboard.press("k")
        assert page.evaluate("document.getElementById('audio').paused") is True
        page.keyboard.press("j")
        assert page.evaluate("document.getElementById('audio').currentTime") <= before + 1.5
        expect(page.locator("#image")).to_have_js_property("complete", True)
        assert page.evaluate("document.getElementById('image').naturalWidth") == 1200

        # An edit: saved with Ctrl+S, into reviews.jsonl, the sidecars, dataset.csv and dataset.json.
        page.fill("textarea[name=caption]", EDITED_CAPTION)
        page.fill("input[name=bpm]", "97")
        page.fill("input[name=keyscale]", "d major")
        expect(page.locator("label:has(textarea[name=caption]) .machine")).to_contain_text("machine:")
        page.locator("input[name=bpm]").press("Control+s")
        expect(page.locator("#message")).to_have_text(
            "saved · updated a.caption.txt, a.json · dataset.csv, dataset.json to follow"
        )
        expect(page.locator("#status")).to_have_text("edited")
        page.evaluate("document.getElementById('audio').currentTime = 4")
        page.wait_for_function("Math.abs(document.getElementById('audio').currentTime - 4) < 0.01")
        page.mouse.move(0, 0)
        page.screenshot(path=str(ROOT / "docs" / "review-file.png"), full_page=True)
        check_edit_landed(songs, out, approved=False)

        # It survives a reload; Ctrl+Enter approves it and moves to the next file of the view.
        page.reload()
        expect(page.locator("textarea[name=caption]")).to_have_value(EDITED_CAPTION)
        expect(page.locator("input[name=keyscale]")).to_have_value("D major")
        expect(page.locator("#status")).to_have_text("edited")
        page.keyboard.press("Control+Enter")
        page.wait_for_url(lambda address: address.endswith(f"/file/{ids['empty.wav']}?sort=duration"))
        expect(page.locator("#image-message")).to_contain_text("empty file")
        check_edit_landed(songs, out, approved=True)

        # Bad input is refused with its reason and saves nothing.
        lines = (out / "reviews.jsonl").read_text(encoding="utf-8")
        page.fill("input[name=bpm]", "1200")
        page.click("#save")
        expect(page.locator("#message")).to_have_text("bpm: 1200 is outside 30-300")
        assert (out / "reviews.jsonl").read_text(encoding="utf-8") == lines

        page.goto(url)
        page.select_option("select[name=status]", "approved")
        expect(paths).to_have_text(["a.wav"])
        page.select_option("select[name=status]", "")
        expect(paths).to_have_count(4)
        page.mouse.move(0, 0)
        page.screenshot(path=str(ROOT / "docs" / "review-table.png"), full_page=True)
        assert errors == []
        browser.close()

    # A re-run of annotate, redoing everything and replacing acecap's values (--overwrite), keeps the edit.
    result = run_acecap(
        "annotate", str(songs), "-o", str(out), "--tasks", "caption,meta", *sum((["-f", f] for f in FORMATS), []),
        "--overwrite", "--model", str(tiny_model), "--device", "cpu", "--max-new-tokens", "8", "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # empty.wav fails, as before
    check_edit_landed(songs, out, approved=True)
    records = {(Path(r["path"]).name, r["task"]): r for r in load_records(out)}
    assert records[("a.wav", "caption")]["caption"] != EDITED_CAPTION  # the machine's record is its own

    with sync_playwright() as playwright, running(out) as url:
        browser = browser_or_skip(playwright)
        page = browser.new_page()
        page.goto(f"{url}file/{ids['a.wav']}")
        expect(page.locator("textarea[name=caption]")).to_have_value(EDITED_CAPTION)
        expect(page.locator("input[name=bpm]")).to_have_value("97")
        expect(page.locator("#status")).to_have_text("approved")
        browser.close()


def check_edit_landed(songs: Path, out: Path, approved: bool) -> None:
    """The edit of a.wav is the latest review and is what every ACE-Step file says (dataset.csv and
    dataset.json are written in the background: given a few seconds)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return _check_edit_landed(songs, out, approved)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _check_edit_landed(songs: Path, out: Path, approved: bool) -> None:
    review = load_reviews(out)[str(songs / "a.wav")]
    assert review["approved"] is approved
    assert (review["edits"]["caption"], review["edits"]["bpm"], review["edits"]["keyscale"]) == (
        EDITED_CAPTION,
        97,
        "D major",
    )
    assert (songs / "a.caption.txt").read_text(encoding="utf-8") == EDITED_CAPTION + "\n"
    sidecar = json.loads((songs / "a.json").read_text(encoding="utf-8"))
    assert (sidecar["caption"], sidecar["bpm"], sidecar["keyscale"]) == (EDITED_CAPTION, 97, "D major")
    table = {row["File"]: row for row in csv.DictReader((out / "dataset.csv").open(encoding="utf-8"))}
    assert (table["a.wav"]["Caption"], table["a.wav"]["BPM"], table["a.wav"]["Key"]) == (
        EDITED_CAPTION,
        "97",
        "D major",
    )
    samples = {s["filename"]: s for s in json.loads((out / "dataset.json").read_text(encoding="utf-8"))["samples"]}
    assert (samples["a.wav"]["caption"], samples["a.wav"]["bpm"]) == (EDITED_CAPTION, 97)
    assert samples["b.flac"]["caption"] != EDITED_CAPTION


# ---- HTTP: what is refused, and how -------------------------------------------------------------------


def test_only_files_the_records_name_are_served(job):
    songs, out = job
    ids = by_name(out)
    (songs / "secret.txt").write_text("not for the browser\n")
    with running(out) as url, httpx.Client(base_url=url) as client:
        whole = (songs / "b.flac").read_bytes()
        part = client.get(f"/api/songs/{ids['b.flac']}/audio", headers={"Range": "bytes=100-199"})
        assert (part.status_code, part.content) == (206, whole[100:200])
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
        assert part.headers["content-type"] == "audio/flac"
        assert client.get(f"/api/songs/{ids['sub/c.mp3']}/audio").content == (songs / "sub" / "c.mp3").read_bytes()
        for path in (
            "/api/songs/4/audio",
            "/api/songs/-1/audio",
            "/api/songs/99999999/image",
            "/file/17",
            f"/api/songs/{songs / 'secret.txt'}/audio",
            "/api/songs/..%2F..%2Fsecret.txt/audio",
            "/static/../../secret.txt",
            "/static/%2e%2e/reviews.py",
            "/api/audio?path=" + str(songs / "secret.txt"),
        ):
            answer = client.get(path)
            assert answer.status_code in (404, 422), path
            assert b"not for the browser" not in answer.content
        # A request addressed to another name is refused (DNS rebinding); JSON only for saves (no form CSRF).
        assert client.get("/api/songs", headers={"Host": "attacker.example"}).status_code == 403
        text = client.post(f"/api/songs/{ids['b.flac']}/review", content='{"approved": true}',
                           headers={"Content-Type": "text/plain"})  # fmt: skip
        assert text.status_code == 415
        bad = client.post(f"/api/songs/{ids['b.flac']}/review", json={"fields": {"tempo": 90}})
        assert bad.status_code == 422
        assert bad.json()["error"] == (
            "unknown field 'tempo': the fields are caption, lyrics, bpm, keyscale, timesignature, language, "
            "is_instrumental"
        )
        assert client.get("/api/songs?sort=size").status_code == 400


def test_a_token_guards_every_request_when_one_is_set_or_the_host_is_not_loopback(job):
    _, out = job
    with running(out, api_key="s3cret") as url:
        assert url.endswith("/?token=s3cret")
        base = url.split("?")[0]
        with httpx.Client(base_url=base) as client:
            for path in ("/", "/api/songs", "/api/songs/0/audio", "/static/review.js"):
                assert client.get(path).status_code == 401, path
            assert client.get("/api/songs", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get("/api/songs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            first = client.get("/file/0?token=s3cret&sort=bpm")  # as opened from the printed URL
            assert first.status_code == 303 and first.headers["location"].endswith("/file/0?sort=bpm")
            assert client.get("/api/songs").status_code == 200  # the cookie it set is enough from now on
    with running(out, host="0.0.0.0") as url:
        token = url.split("?token=")[1]
        assert len(token) >= 24
        port = url.split(":")[2].split("/")[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/api/songs").status_code == 401
            assert client.get("/api/songs", headers={"Authorization": f"Bearer {token}"}).status_code == 200


# ---- the store, the index and the export --------------------------------------------------------------


def test_fields_are_checked_and_written_the_way_ace_step_reads_them():
    current = {"caption": "x", "lyrics": None, "bpm": 120, "keyscale": "C major", "timesignature": "4",
               "language": "en", "is_instrumental": False}  # fmt: skip
    fields = check_fields({"bpm": " 96 ", "keyscale": "f# MIN", "timesignature": "6/8", "language": "PT-br"}, current)
    shown = (fields["bpm"], fields["keyscale"], fields["timesignature"], fields["language"])
    assert shown == (96, "F# minor", "6/8", "pt-br")
    assert check_fields({"keyscale": "Bb Maj", "bpm": ""}, current)["keyscale"] == "Bb major"
    assert check_fields({"bpm": ""}, current)["bpm"] is None
    assert check_fields({"is_instrumental": True}, current)["lyrics"] == "[Instrumental]"
    assert check_fields({"caption": "  "}, current)["caption"] is None
    machine = {**current, "caption": "A caption the model ended with a newline.\n"}
    unchanged = check_fields({"caption": machine["caption"], "bpm": "120"}, machine)
    assert changes(unchanged, machine) == {}  # nothing a person changed: no sidecar is rewritten
    assert changes({**unchanged, "bpm": 121}, machine) == {"bpm": 121}
    for given, reason in (
        ({"bpm": "12O"}, "bpm: '12O' is not a whole number"),
        ({"bpm": 96.5}, "bpm: 96.5 is not a whole number"),
        ({"bpm": float("inf")}, "bpm: inf is not a whole number"),
        ({"bpm": True}, "bpm: True is not a whole number"),
        ({"keyscale": "H major"}, "keyscale: 'H major' is not a key like 'C major' or 'F# minor'"),
        ({"timesignature": "4/5"}, "timesignature: '4/5' is not beats per bar (3, 4) or a metre (6/8)"),
        ({"language": "english"}, "language: 'english' is not an ISO code (en, zh, pt-br) or 'unknown'"),
        ({"is_instrumental": "yes"}, "is_instrumental: must be true or false"),
        ({"caption": 5}, "caption: must be text"),
    ):
        with pytest.raises(ValueError) as error:
            check_fields(given, current)
        assert str(error.value) == reason


def synthetic_records(out: Path, count: int) -> list[dict]:
    """`count` files with caption and meta records of varied values, flags and errors."""
    rng = np.random.default_rng(1)
    records = []
    for index in range(count):
        path = f"/music/{'abc'[index % 3]}/song{index:03d}.wav"
        common = {"path": path, "size": 1, "mtime_ns": 1, "model": "m", "prompt": "", "duration": float(index % 7)}
        broken = index % 11 == 0
        caption = None if broken else f"take {index} with {'piano' if index % 4 else 'guitar'}"
        records.append({**common, "task": "caption", "caption": caption, "error": "cannot decode" if broken else None,
                        "finished": index % 5 != 0, "truncated": index % 13 == 0,
                        "repetitive": index % 17 == 0})  # fmt: skip
        confidence = rng.uniform(0, 1, 3).round(3)
        records.append({**common, "task": "meta", "bpm": int(rng.integers(60, 180)), "keyscale": "A minor",
                        "timesignature": 4, "bpm_confidence": confidence[0], "keyscale_confidence": confidence[1],
                        "timesignature_confidence": confidence[2], "error": None})  # fmt: skip
    out.mkdir()
    (out / "annotations.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    return records


def test_the_index_filters_and_sorts_as_a_plain_scan_does(tmp_path):
    synthetic_records(tmp_path / "out", 120)
    catalog = Catalog(tmp_path / "out")
    reviews = [(3, True), (5, False), (8, True)]
    for entry_id, approved in reviews:
        edits = {"bpm": 100 + entry_id}
        catalog.update(entry_id, {"path": catalog.entries[entry_id].path, "approved": approved, "edits": edits})
    entries = catalog.entries

    def scan(keep, key, descending=False):
        chosen = [e for e in entries if keep(e)]
        present = sorted((e for e in chosen if key(e) is not None), key=key, reverse=descending)
        # sorted(reverse=True) keeps ties in their first order; the index reverses them: compare as sets of ties
        return [e.id for e in present] + [e.id for e in chosen if key(e) is None]

    def same(ids, expected, key):
        assert [key(entries[i]) for i in ids] == [key(entries[i]) for i in expected]
        assert sorted(ids) == sorted(expected)

    bpm = lambda e: e.fields["bpm"]  # noqa: E731
    assert catalog.select(Query()).tolist() == scan(lambda e: True, lambda e: e.shown)
    for status in STATUSES:
        same(catalog.select(Query(status=status, sort="bpm")), scan(lambda e, s=status: e.status == s, bpm), bpm)
    for flag in FLAGS:
        expected = scan(lambda e, f=flag: f in e.flags, bpm, descending=True)
        same(catalog.select(Query(flag=flag, sort="bpm", descending=True)), expected, bpm)
    low = lambda e: e.min_confidence is not None and e.min_confidence < 0.2  # noqa: E731
    duration = lambda e: e.duration  # noqa: E731
    same(catalog.select(Query(below=0.2, sort="duration")), scan(low, duration), duration)
    guitar = lambda e: "guitar" in (e.fields["caption"] or "")  # noqa: E731
    assert catalog.select(Query(text="GUITAR")).tolist() == scan(guitar, lambda e: e.shown)
    assert catalog.counts() == {"all": 120, "unreviewed": 117, "edited": 1, "approved": 2}
    view = catalog.neighbours(Query(status="approved"), 8)
    assert view == {"position": 2, "total": 2, "previous": 3, "next": None}
    assert catalog.neighbours(Query(status="edited"), 8)["position"] is None
    with pytest.raises(ValueError, match="sort 'size'"):
        Query(sort="size")


@pytest.mark.slow
def test_export_writes_the_approved_songs_with_their_reviews(job, tmp_path):
    songs, out = job
    ids = by_name(out)
    with running(out) as url, httpx.Client(base_url=url) as client:
        approved = client.post(f"/api/songs/{ids['sub/c.mp3']}/review",
                               json={"fields": {"caption": "Approved as corrected.", "language": "en"},
                                     "approved": True})  # fmt: skip
        assert approved.status_code == 200 and approved.json()["status"] == "approved"
        edited = client.post(f"/api/songs/{ids['b.flac']}/review", json={"fields": {"caption": "Only edited."}})
        assert edited.json()["status"] == "edited"
    target = tmp_path / "approved"
    result = run_acecap("review", str(out), "--export", "approved", "-f", "acestep-dataset", "-f", "csv",
                        "--export-to", str(target))  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = json.loads((target / "dataset.json").read_text(encoding="utf-8"))
    approved_names = {name for name, review in ((Path(p).name, r) for p, r in load_reviews(out).items())
                      if review["approved"]}  # fmt: skip
    assert {s["filename"] for s in dataset["samples"]} == approved_names and "c.mp3" in approved_names
    sample = next(s for s in dataset["samples"] if s["filename"] == "c.mp3")
    assert (sample["caption"], sample["language"]) == ("Approved as corrected.", "en")
    assert dataset["metadata"]["num_samples"] == len(approved_names)
    rows = list(csv.DictReader((target / "dataset.csv").open(encoding="utf-8")))
    assert {r["File"] for r in rows} == approved_names
    usage = run_acecap("review", str(out), "-f", "csv")
    assert usage.returncode == 2 and "go with --export" in usage.stderr
    synthetic_records(tmp_path / "unreviewed", 5)
    with pytest.raises(ValueError, match="no song of .* is approved yet"):
        export_reviewed(tmp_path / "unreviewed", "approved", ["csv"])
    with pytest.raises(ValueError, match="no annotate records here"):
        export_reviewed(tmp_path / "approved", "all", ["csv"])  # a folder, but no records in it


def test_an_export_leaves_unsure_machine_values_unknown_as_annotate_does(tmp_path):
    records = synthetic_records(tmp_path / "out", 12)
    meta = {Path(r["path"]).name: r for r in records if r["task"] == "meta"}
    exported = {}
    for threshold in (0.0, 0.5):
        export_reviewed(tmp_path / "out", "all", ["csv"], tmp_path / str(threshold), min_confidence=threshold)
        exported[threshold] = {
            row["File"]: row for row in csv.DictReader((tmp_path / str(threshold) / "dataset.csv").open())
        }
    assert len(exported[0.0]) == 12 and all(row["BPM"] for row in exported[0.0].values())
    for name, row in exported[0.5].items():
        assert (row["BPM"] != "") == (meta[name]["bpm_confidence"] >= 0.5)
        assert (row["Key"] != "") == (meta[name]["keyscale_confidence"] >= 0.5)
    assert any(not row["BPM"] for row in exported[0.5].values()) and any(row["BPM"] for row in exported[0.5].values())
    usage = run_acecap("review", str(tmp_path / "out"), "--meta-min-confidence", "0.5")
    assert usage.returncode == 2 and "go with --export" in usage.stderr
    # Approved as they stand: a review holds every label, but a machine value nobody changed stays withheld; a
    # value the person changed is theirs, whatever the machine's confidence was.
    catalog = Catalog(tmp_path / "out")
    for entry in catalog.entries:
        fields = {**entry.fields, "bpm": 77} if entry.id == 0 else entry.fields
        append_review(tmp_path / "out", entry.path, changes(check_fields(fields, entry.fields), entry.machine), True)
    export_reviewed(tmp_path / "out", "approved", ["csv"], tmp_path / "approved", min_confidence=0.5)
    approved = {row["File"]: row for row in csv.DictReader((tmp_path / "approved" / "dataset.csv").open())}
    assert approved == {name: {**row, "BPM": "77"} if name == Path(catalog.entries[0].path).name else row
                        for name, row in exported[0.5].items()}  # fmt: skip


# ---- reviews over later runs, and saves over the dataset files ----------------------------------------


def records_of(songs: Path, name: str, **tasks: dict) -> list[dict]:
    """One record per task for songs/name, each task's values as given (an `error` makes it a failed one)."""
    common = {"path": str(songs / name), "size": 1, "mtime_ns": 1, "prompt": "", "duration": 3.0, "error": None}
    return [{**common, "task": task, "model": "m", **values} for task, values in tasks.items()]


def add_records(out: Path, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "annotations.jsonl").open("a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))


def sample(out: Path, name: str) -> dict:
    return next(s for s in json.loads((out / "dataset.json").read_text())["samples"] if s["filename"] == name)


def test_a_review_holds_what_the_person_changed_so_what_later_runs_redo_still_lands(tmp_path):
    songs, out = tmp_path / "songs", tmp_path / "labels"
    songs.mkdir()
    cut = {"caption": "A cut", "finished": False}
    add_records(out, records_of(songs, "approved.wav", caption=cut) + records_of(songs, "tempo.wav", caption=cut)
                + records_of(songs, "tempo.wav", meta={"bpm": 120, "bpm_confidence": 0.9}))  # fmt: skip
    ids = by_name(out)
    with running(out) as url, httpx.Client(base_url=url) as client:
        for name, change in (("approved.wav", {}), ("tempo.wav", {"bpm": "97"})):
            shown = client.get(f"/api/songs/{ids[name]}").json()  # what the page sends: every field it shows
            fields = {key: "" if value is None else value for key, value in shown["fields"].items()}
            fields["is_instrumental"] = bool(fields["is_instrumental"])
            answer = client.post(f"/api/songs/{ids[name]}/review", json={"fields": {**fields, **change},
                                 "approved": True, "version": shown["version"]})  # fmt: skip
            assert answer.status_code == 200, answer.text
    assert {Path(p).name: r["edits"] for p, r in load_reviews(out).items()} == {
        "approved.wav": {},
        "tempo.wav": {"bpm": 97},
    }
    # Later runs: lyrics for both, and whole captions (a higher --max-new-tokens).
    whole = {"caption": "A whole caption.", "finished": True}
    lyrics = {"lyrics": "[verse]\nla la", "language": "en", "is_instrumental": False}
    add_records(out, records_of(songs, "approved.wav", caption=whole, lyrics=lyrics)
                + records_of(songs, "tempo.wav", caption=whole, lyrics=lyrics))  # fmt: skip
    export_reviewed(out, "approved", ["acestep", "acestep-dataset"])
    for name in ("approved.wav", "tempo.wav"):
        assert (sample(out, name)["caption"], sample(out, name)["lyrics"]) == ("A whole caption.", "[verse]\nla la")
        assert (songs / name.replace(".wav", ".lyrics.txt")).read_text() == "[verse]\nla la\n"
    assert (sample(out, "tempo.wav")["bpm"], sample(out, "approved.wav")["bpm"]) == (97, None)
    # A line written before reviews kept only edits (all seven labels) still lets the later lyrics through.
    legacy = {"path": str(songs / "approved.wav"), "approved": True, "reviewed_at": "2026-11-20T00:00:00+00:00",
              "fields": {"caption": "Said by a person.", "lyrics": None, "bpm": None, "keyscale": None,
                         "timesignature": None, "language": None, "is_instrumental": False}}  # fmt: skip
    with (out / "reviews.jsonl").open("a") as handle:
        handle.write(json.dumps(legacy) + "\n")
    export_reviewed(out, "approved", ["acestep-dataset"])
    assert (sample(out, "approved.wav")["caption"], sample(out, "approved.wav")["lyrics"]) == (
        "Said by a person.", "[verse]\nla la")  # fmt: skip


def test_a_save_changes_only_its_labels_in_the_dataset_files_and_two_tabs_cannot_undo_each_other(tmp_path):
    songs, out = tmp_path / "songs", tmp_path / "labels"
    songs.mkdir()
    meta = {"bpm": 120, "bpm_confidence": 0.9, "keyscale": "C minor", "keyscale_confidence": 0.2,
            "timesignature": 4, "timesignature_confidence": 0.1}  # fmt: skip
    add_records(
        out,
        records_of(songs, "plain.wav", caption={"caption": "Plain."}, meta=meta)
        + records_of(songs, "moved.wav", caption={"caption": "Moved."})
        + records_of(songs, "broken.wav", caption={"caption": None, "error": "cannot decode: no audio"}),
    )
    records = latest_per_input(load_records(out))
    export(records, {r["path"]: Path(Path(r["path"]).name) for r in records}, FORMATS, out, min_confidence=0.3)
    dataset = json.loads((out / "dataset.json").read_text())  # the songs were moved since it was written
    next(s for s in dataset["samples"] if s["filename"] == "moved.wav")["audio_path"] = "/old/place/moved.wav"
    (out / "dataset.json").write_text(json.dumps(dataset))
    ids = by_name(out)
    with running(out) as url, httpx.Client(base_url=url) as client:
        first, second = (client.get(f"/api/songs/{ids['plain.wav']}").json() for _ in range(2))  # two tabs
        saved = client.post(f"/api/songs/{ids['plain.wav']}/review", json={
            "fields": {"caption": "Plain, corrected."}, "version": first["version"]})  # fmt: skip
        assert saved.status_code == 200 and saved.json()["following"] == ["dataset.csv", "dataset.json"]
        stale = client.post(f"/api/songs/{ids['plain.wav']}/review", json={
            "fields": {**second["fields"], "bpm": 100}, "version": second["version"]})  # fmt: skip
        assert stale.status_code == 409 and "reload" in stale.json()["error"]
        client.post(f"/api/songs/{ids['moved.wav']}/review", json={"fields": {"bpm": 88}})
        client.post(f"/api/songs/{ids['plain.wav']}/review", json={"fields": {"timesignature": "", "bpm": ""}})
        broken = client.post(f"/api/songs/{ids['broken.wav']}/review", json={
            "fields": {"caption": "Heard in another player: a cello."}, "approved": True})  # fmt: skip
        assert broken.status_code == 200
    rows = {row["File"]: row for row in csv.DictReader((out / "dataset.csv").open())}
    # The withheld key (confidence 0.2) stays withheld; only what the person changed moved.
    assert rows["plain.wav"] == {"File": "plain.wav", "BPM": "", "Key": "", "Caption": "Plain, corrected."}
    plain = sample(out, "plain.wav")
    assert (plain["caption"], plain["bpm"], plain["keyscale"], plain["timesignature"]) == (
        "Plain, corrected.", None, "", "")  # fmt: skip
    assert sample(out, "moved.wav")["bpm"] == 88  # found by its name
    sidecar = json.loads((songs / "plain.json").read_text())  # cleared: the trainer's keys stay, as unknown
    assert (sidecar["bpm"], sidecar["timesignature"], sidecar["keyscale"]) == (None, "", "")
    exported = export_reviewed(out, "approved", ["acestep-dataset"], tmp_path / "lora")[0]
    assert exported and [
        s["filename"] for s in json.loads((tmp_path / "lora" / "dataset.json").read_text())["samples"]
    ] == ["broken.wav"]  # every task failed, yet a person labelled and approved it


def test_a_name_that_is_not_utf8_is_shown_in_the_table_with_its_bytes_escaped(tmp_path):
    songs = tmp_path / "songs"
    name = os.fsdecode(b"caf\xe9.wav")
    add_records(tmp_path / "labels", records_of(songs, name, caption={"caption": "A song."}))
    with running(tmp_path / "labels") as url, httpx.Client(base_url=url) as client:
        table = client.get("/api/songs")
        assert table.status_code == 200 and table.json()["rows"][0]["path"] == "caf\\xe9.wav"
        detail = client.get("/api/songs/0")
        assert detail.status_code == 200 and detail.json()["file"].endswith("caf\\xe9.wav")


def test_review_benchmark_runs_and_its_counts_and_arithmetic_hold(tmp_path):
    bench = load_program("review")
    report = bench.main(["--files", "1500", "--repeats", "2", "--dataset-files", "-o", str(tmp_path)])
    assert report == json.loads((tmp_path / "review.json").read_text())
    table = (tmp_path / "review.md").read_text()
    for case in report["cases"]:
        times = case["times_s"]
        assert len(times) == 2 and case["first_s"] == times[0] and case["worst_s"] == max(times)
        assert case["median_s"] == statistics.median(times) and case["within_limit"] == (max(times) <= 1.0)
        assert case["answered"] == case["expected"] or case["expected"] is None
        assert f"| {case['case']} | {case['first_s'] * 1000:.0f} ms | {case['median_s'] * 1000:.0f} ms |" in table
    assert report["passed"] == all(case["within_limit"] for case in report["cases"] if case["criterion"])
    assert report["setup"]["records"] == 3 * 1500 and report["dataset_save"]["dataset_mb"] > 0
    rewrites = report["dataset_save"]["rewrite_s"]
    assert len(rewrites) == 2 and report["dataset_save"]["rewrite_median_s"] == statistics.median(rewrites)

    # The counts the answers were checked against agree with a plain reading of the files written.
    expected = bench.write_job(tmp_path / "job", 400, seed=3)
    records = [json.loads(line) for line in (tmp_path / "job" / "annotations.jsonl").read_text().splitlines()]
    reviews = [json.loads(line) for line in (tmp_path / "job" / "reviews.jsonl").read_text().splitlines()]
    by_path: dict[str, dict] = {}
    for record in records:
        by_path.setdefault(record["path"], {})[record["task"]] = record
    lowest = {
        p: min(t["meta"][f"{k}_confidence"] for k in ("bpm", "keyscale", "timesignature")) for p, t in by_path.items()
    }
    texts = {p: f"{p}\n{t['caption']['caption'] or ''}\n{t['lyrics']['lyrics']}".lower() for p, t in by_path.items()}
    assert expected["approved"] == sum(r["approved"] for r in reviews)
    assert expected["edited"] == sum(not r["approved"] for r in reviews)
    assert expected["error"] == sum(any(r["error"] for r in t.values()) for t in by_path.values())
    assert expected["below_0.2"] == sum(value < 0.2 for value in lowest.values())
    assert expected["search"] == sum(bench.SEARCH in text for text in texts.values())
    statuses = {status: expected[status] for status in STATUSES}
    assert Catalog(tmp_path / "job").counts() == {"all": 400, **statuses}


@pytest.mark.slow
def test_the_command_prints_its_address_serves_and_stops_on_ctrl_c(job, tmp_path):
    _, out = job
    command = [sys.executable, "-m", "acecap", "review", str(out), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("acecap review: 4 files of ") and line.endswith(" (Ctrl-C stops)\n"), line
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert httpx.get(f"{url}api/songs").json()["counts"]["all"] == 4
    finally:
        server.send_signal(signal.SIGINT)
        # uvicorn shuts down, then re-raises the interrupt: the shell's usual status for Ctrl-C
        assert server.wait(timeout=30) == 130, server.stderr.read()
    empty = tmp_path / "nothing"
    empty.mkdir()
    refused = run_acecap("review", str(empty))
    assert refused.returncode == 2 and "no annotate records here" in refused.stderr


def test_the_wheel_carries_the_pages_so_review_works_installed_and_offline(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("acecap-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assets = {f"acecap/review_static/{p.name}" for p in (ROOT / "src/acecap/review_static").iterdir()}
    assert {"acecap/review_static/table.html", "acecap/review_static/file.js"} <= assets <= packed
    for name in ("table.html", "file.html"):  # nothing fetched from elsewhere: no CDN, works offline
        page = (ROOT / "src/acecap/review_static" / name).read_text()
        assert re.findall(r'(?:src|href)="(?![/#])', page) == []
