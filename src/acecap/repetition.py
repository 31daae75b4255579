"""Repetition loops: the captioner's known failure, the same phrase over and over to the end of its text.

Two signs, either enough:
- the text's end repeats one phrase back to back: the shortest stretch of characters (whitespace counted as
  one space, so a phrase looping across lines still matches) of which whole copies end the text. A caption
  never says one thing four times in a row; songs do repeat a line, so lyrics need eight copies;
- for captions, the text compresses like a loop, not like prose: zlib's compression ratio above 2.4, the
  threshold openai/whisper uses to reject looping transcripts (English prose is about 1.5-2; a loop with
  small variations, which the first sign misses, is 4 and more). Lyrics repeat choruses, so not for them.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

MIN_COPIES = {"caption": 4, "lyrics": 8}  # back-to-back copies of one phrase at the end that make a loop
MIN_LOOP_CHARS = 40  # and at least this much text: "la la la la" or "!!!!!!!!" is not a loop
MAX_COMPRESSION_RATIO = 2.4  # a caption compressing better than this is a loop (whisper's threshold)
_SPACE = re.compile(r"\s+")


def _tails(text: str) -> list[tuple[str, int]]:
    """Each phrase the text's end repeats, with how many whole copies of it end the text back to back (the
    last copy may be cut short, as a text cut at the token limit is), shortest phrase first."""
    flat = _SPACE.sub(" ", text).strip()
    codes = np.frombuffer(flat.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    size, found = len(codes), []
    for period in range(1, size // 2 + 1):
        same = codes[period:] == codes[:-period]  # same[i]: character i + period repeats character i
        run = size - period if same.all() else int(np.argmin(same[::-1]))  # how far back the repetition reaches
        if run >= period:  # at least two copies
            start = size - run - period
            found.append((flat[start : start + period], (run + period) // period))
    return found


def is_repetitive(text: str, task: str = "caption") -> bool:
    """Whether the text ends in a loop (see the module's note)."""
    least = MIN_COPIES.get(task, MIN_COPIES["caption"])
    if task != "lyrics" and compression_ratio(text) > MAX_COMPRESSION_RATIO:
        return True
    return any(
        copies >= least and copies * len(phrase) >= MIN_LOOP_CHARS and any(c.isalnum() for c in phrase)
        for phrase, copies in _tails(text)
    )


def compression_ratio(text: str) -> float:
    """The text's UTF-8 size over its zlib-compressed size: near 1 for short text, 1.5-2 for prose."""
    data = text.encode("utf-8", "surrogatepass")
    return len(data) / len(zlib.compress(data)) if data else 0.0
