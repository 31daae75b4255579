"""How an annotate run is going: the progress bar, the counts behind it, and the closing summary."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("acecap")


# Outputs that worked but may be wrong, counted in the summary: a text cut at --max-new-tokens, a text ending in
# a loop, a file longer than what was captioned, one shorter than its header (--allow-partial), a silent file, a
# file over an hour.
FLAGS = ("unfinished", "repetitive", "truncated", "partial", "silent", "long")
DONE = {"caption": "captioned", "lyrics": "transcribed", "meta": "analysed"}  # the summary's word per task


def output_flags(record: dict) -> tuple[str, ...]:
    """The FLAGS a record raises (none for a failed file: its error says it all)."""
    if record.get("error"):
        return ()
    return tuple(f for f in FLAGS if (record.get("finished") is False if f == "unfinished" else record.get(f)))


@dataclass
class Summary:
    total: int
    skipped: int  # finished by an earlier run
    captioned: int = 0  # succeeded (captioned, transcribed or analysed, by task)
    failures: list[tuple[str, str]] = field(default_factory=list)
    flagged: dict[str, int] = field(default_factory=dict)  # FLAGS → how many of this run's outputs raise it
    task: str = "caption"
    max_new_tokens: int | None = None  # the run's, for the summary's advice
    not_processed: int = 0  # left when every worker had died, or the run was interrupted
    interrupted: bool = False  # Ctrl-C: the run stopped early
    audio_seconds: float = 0.0
    elapsed_s: float = 0.0
    per_device: dict[int, dict] = field(default_factory=dict)  # worker rank → device, files, audio_s
    unmerged: str | None = None  # why annotations.jsonl could not be written (a full disk)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.not_processed and not self.unmerged


class Progress:
    """The progress bar and the summary's counts, fed by whichever workers run the job."""

    def __init__(self, summary: Summary, pending: int, show: bool, started: float):
        from tqdm.auto import tqdm

        self.summary, self.started, self.seen = summary, started, 0
        self.bar = tqdm(total=pending, unit="file", disable=not show, dynamic_ncols=True, smoothing=0.1)

    def stats(self, rank: int, device: str) -> dict:
        return self.summary.per_device.setdefault(rank, {"device": device, "files": 0, "audio_s": 0.0})

    def loaded(self, rank: int, device: str, load_s: float) -> None:
        stats = self.stats(rank, device)
        stats["device"], stats["load_s"] = device, load_s
        if self.summary.task == "meta":
            log.info("worker %d: reading tags and analysing the signal on %s (no model)", rank, device)
        else:
            log.info("worker %d: model on %s in %.1f s", rank, device, load_s)

    def records(self, rank: int, device: str, entries: list[tuple[str, float, str | None, tuple[str, ...]]]) -> None:
        summary, stats = self.summary, self.stats(rank, device)
        for path, duration, error, flags in entries:
            self.seen += 1
            stats["files"] += 1
            stats["audio_s"] += duration
            summary.audio_seconds += duration
            if error:
                summary.failures.append((path, error))
            else:
                summary.captioned += 1
            for flag in flags:
                summary.flagged[flag] = summary.flagged.get(flag, 0) + 1
        elapsed = time.perf_counter() - self.started
        self.bar.update(len(entries))  # the bar's own [elapsed<left] is the ETA: one estimate, not two
        self.bar.set_postfix_str(
            f"{summary.audio_seconds / 3600:.2f} h audio, {self.seen / elapsed * 60:.1f} files/min, "
            f"{summary.audio_seconds / elapsed:.1f} audio-s/s, {len(summary.failures)} failed"
        )

    def close(self) -> None:
        self.bar.close()


def summary_table(summary: Summary) -> str:
    """The closing report: counts, rates, per device, and every failure with its reason."""
    minutes = summary.elapsed_s / 60
    lines = [
        f"files          {summary.total} ({summary.skipped} done earlier)",
        f"{DONE.get(summary.task, 'done'):<15}{summary.captioned}",
        *(
            f"  {flag:<13}{summary.flagged[flag]}: {_advice(flag, summary)}"
            for flag in FLAGS
            if flag in summary.flagged
        ),
        f"failed         {len(summary.failures)}",
        f"audio          {summary.audio_seconds / 3600:.2f} h in {summary.elapsed_s:.1f} s",
    ]
    if summary.elapsed_s > 0 and summary.captioned + len(summary.failures):
        done = summary.captioned + len(summary.failures)
        lines.append(
            f"rate           {done / minutes:.1f} files/min, {summary.audio_seconds / summary.elapsed_s:.1f} audio-s/s"
        )
    for rank, stats in summary.per_device.items():
        rate = stats["audio_s"] / summary.elapsed_s if summary.elapsed_s else 0.0
        files = f"{stats['files']} file" + ("" if stats["files"] == 1 else "s")
        lines.append(f"  worker {rank} on {stats['device']}: {files}, {rate:.1f} audio-s/s")
    if summary.not_processed:
        why = "interrupted" if summary.interrupted else "no worker left"
        lines.append(f"not processed  {summary.not_processed} ({why}; run the command again)")
    if summary.unmerged:
        lines.append(f"not merged     annotations.jsonl could not be written ({summary.unmerged}); the records are "
                     "safe in the annotations.part-*.jsonl files, and the next run merges them")  # fmt: skip
    for path, error in summary.failures:
        lines.append(f"  FAILED {path}: {error}")
    return "\n".join(lines)


def _advice(flag: str, summary: Summary) -> str:
    """What a flag means, and what to do about it."""
    if flag == "unfinished":
        return (f"cut at --max-new-tokens {summary.max_new_tokens} before the model finished; run again with a "
                "higher --max-new-tokens and those files are redone")  # fmt: skip
    return {
        "repetitive": "the text ends in a loop (the records' `repetitive`; review them with acecap review); "
        "--repetition-penalty above 1 discourages loops",
        "truncated": "longer than what was captioned (--max-duration); --long-audio segment or full for the rest",
        "partial": "shorter than its header says (cut or damaged); --allow-partial described what it holds (the "
        "records' `partial` says how much)",
        "silent": "nothing audible (peak below -80 dBFS)",
        "long": "over an hour: probably not one song",
    }[flag]
