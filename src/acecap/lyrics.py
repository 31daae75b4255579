"""The transcriber's text turned into what ACE-Step's trainer reads: a language code and tagged lyrics.

The ACE-Step Transcriber answers in two sections, `# Languages` (a code) and `# Lyrics` (lines with section
tags such as `[Verse]`). Sampled text is not always that tidy: names instead of codes, `(Chorus)` or
`Verse 1:` instead of `[Verse 1]`, unclosed brackets, no sections at all. Each is normalised here, and the
raw text is kept beside the result so nothing the model said is lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INSTRUMENTAL = "[Instrumental]"

# Names the model (or a person) may write instead of an ISO 639-1 code.
LANGUAGE_NAMES = {
    "english": "en", "chinese": "zh", "mandarin": "zh", "cantonese": "yue", "japanese": "ja", "korean": "ko",
    "spanish": "es", "french": "fr", "german": "de", "italian": "it", "portuguese": "pt", "russian": "ru",
    "arabic": "ar", "hindi": "hi", "turkish": "tr", "dutch": "nl", "polish": "pl", "swedish": "sv",
    "thai": "th", "vietnamese": "vi", "indonesian": "id", "ukrainian": "uk", "greek": "el", "hebrew": "he",
    "中文": "zh", "普通话": "zh", "粤语": "yue", "英语": "en", "日语": "ja", "韩语": "ko",
}  # fmt: skip
NO_LANGUAGE = {"", "none", "unknown", "instrumental", "n/a", "na", "null", "-", "无"}
NO_VOCALS = {"instrumental", "inst", "no vocals", "no lyrics", "none", "纯音乐", "无歌词", "music"}

SECTIONS = (
    "intro", "verse", "pre-chorus", "prechorus", "chorus", "post-chorus", "hook", "refrain", "bridge",
    "breakdown", "drop", "build", "build-up", "interlude", "instrumental", "inst", "solo", "guitar solo",
    "rap", "spoken", "outro", "ending", "fade out", "coda",
)  # fmt: skip
# "pre-chorus", "pre chorus" and "prechorus" are one section.
_SECTION = "|".join(re.sub(r"[- ]", r"[-\\s]*", s) for s in sorted(SECTIONS, key=len, reverse=True))
# A line that is only a section name: "[Verse 1]", "[ chorus ]", "(Chorus)", "Verse 2:", "[Bridge", "**Chorus**".
_TAG_LINE = re.compile(
    rf"^\s*[\[(【（*]*\s*(?P<name>(?:{_SECTION})(?:\s*[-_ ]?\s*\d+)?)\s*[\])】）*]*\s*:?\s*$", re.IGNORECASE
)
CANONICAL = {"prechorus": "Pre-Chorus", "postchorus": "Post-Chorus", "buildup": "Build-Up", "inst": "Instrumental"}
_HEADER = re.compile(r"^\s*#+\s*(?P<name>[^\n]+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Lyrics:
    language: str  # ISO 639-1 code (yue for Cantonese) or "unknown"
    lyrics: str  # section-tagged lines, or "[Instrumental]"
    is_instrumental: bool


def parse_transcript(text: str) -> Lyrics:
    """Language and cleaned lyrics from the transcriber's answer (any shape it takes)."""
    sections = _sections(text)
    language = _language(sections.get("languages", sections.get("language", "")))
    body = sections.get("lyrics", sections.get("", ""))
    lines = _clean_lines(body)
    if not any(not _is_tag(line) for line in lines):  # tags only, or nothing: no one sings
        return Lyrics(language=language, lyrics=INSTRUMENTAL, is_instrumental=True)
    return Lyrics(language=language, lyrics="\n".join(lines), is_instrumental=False)


def _sections(text: str) -> dict[str, str]:
    """Text under each `# Header`, keyed by the lower-cased header; text before any header under ''."""
    found: dict[str, str] = {}
    marks = list(_HEADER.finditer(text))
    found[""] = text[: marks[0].start()] if marks else text
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        found[mark["name"].strip().lower()] = text[mark.end() : end]
    return found


def _language(text: str) -> str:
    """The first language given, as a code; 'unknown' when none (never a silent 'en')."""
    first = re.split(r"[,;/\n|、，]", text.strip(), maxsplit=1)[0].strip().strip("`*\"'[]()").strip()
    word = first.lower()
    if word in NO_LANGUAGE:
        return "unknown"
    if word in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[word]
    code = word.replace("_", "-").split("-")[0]  # en-US, zh_CN → en, zh
    if re.fullmatch(r"[a-z]{2,3}", code):
        return code
    return "unknown"


def _is_tag(line: str) -> bool:
    return line.startswith("[") and line.endswith("]")


def _tag(name: str) -> str:
    """'pre chorus 2' → '[Pre-Chorus 2]'."""
    number = re.search(r"\d+$", name)
    words = re.findall(r"[^\W\d_]+", name[: number.start()] if number else name)
    label = CANONICAL.get("".join(words).lower(), " ".join(word.capitalize() for word in words))
    return f"[{label} {number[0]}]" if number else f"[{label}]"


def _clean_lines(body: str) -> list[str]:
    """Section tags normalised, blank runs squeezed, repeated tags and trailing tags dropped."""
    lines: list[str] = []
    for raw in body.strip().splitlines():
        line = raw.strip()
        if not line:
            if lines and lines[-1]:
                lines.append("")
            continue
        tag = _TAG_LINE.match(line)
        if tag:
            line = _tag(tag["name"])
        elif line.strip("[]()【】（） ").lower() in NO_VOCALS:
            line = INSTRUMENTAL
        elif re.fullmatch(r"\[\s*\]|\(\s*\)", line):
            continue  # an empty tag
        if _is_tag(line) and lines and lines[-1] == line:
            continue
        lines.append(line)
    while lines and (not lines[-1] or (_is_tag(lines[-1]) and lines[-1] != INSTRUMENTAL)):
        lines.pop()  # a tag with no lines after it ends nothing
    while lines and not lines[0]:
        lines.pop(0)
    return lines
