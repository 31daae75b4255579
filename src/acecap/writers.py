"""Result files: written whole or not at all, so a crash never leaves a half file that looks done.

New files get the permissions the umask gives (a trainer running as another user can read them); a file
that is replaced keeps its own. File names that are not valid UTF-8 (Python holds their undecodable bytes
as lone surrogates, PEP 383) are written as those same bytes in text files, and as `\\udcXX` escapes in
JSON, which `json.loads` turns back into the same string and `os.fsencode` into the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path

_SURROGATE = re.compile("[\ud800-\udfff]")


def to_json(value, indent: int | None = None) -> str:
    """JSON text that is valid UTF-8 whatever file names it holds (see the module's note)."""
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    # json.dumps leaves lone surrogates raw, and they can only stand inside strings: escape them there.
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename over it (text as UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name does not grow with the target's: a name near the 255-byte limit still works.
    tmp = path.parent / f".acecap-{secrets.token_hex(8)}.tmp"
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask, as open() does
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else text)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(folder: Path) -> None:
    """Fail at once, before any model loads, when `folder` cannot take files (made if missing)."""
    if folder.exists() and not folder.is_dir():
        raise OSError(f"the output folder {folder} is a file: give a folder (it is made if missing)")
    probe = folder / f".acecap-{secrets.token_hex(8)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines in one write and flush them to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def check_unique_names(paths: list[str]) -> None:
    """Outputs are named after the input's file name; two inputs with one name would overwrite each other."""
    files: dict[str, str] = {}
    for path in paths:
        files.setdefault(os.path.abspath(path), path)  # one file named twice is one input
    groups: dict[str, list[str]] = {}
    for path in files.values():
        groups.setdefault(Path(path).stem, []).append(path)
    clashes = [" and ".join(group) for group in groups.values() if len(group) > 1]
    if clashes:
        raise ValueError(f"{'; '.join(clashes)} would write the same output files; caption them separately")


def write_result(result, output_dir: Path, fmt: str) -> Path:
    """txt: <name>.<task>.txt; json: <name>.<task>.json; jsonl: one line appended to <task>.jsonl."""
    stem = Path(result.source).stem
    if fmt == "txt":
        path = output_dir / f"{stem}.{result.task}.txt"
        atomic_write(path, result.text + "\n")
    elif fmt == "json":
        path = output_dir / f"{stem}.{result.task}.json"
        atomic_write(path, to_json(result.to_dict(), indent=2) + "\n")
    elif fmt == "jsonl":
        path = output_dir / f"{result.task}.jsonl"
        append_lines(path, [to_json(result.to_dict())])
    else:
        raise ValueError(f"unknown format {fmt!r}: use txt, json or jsonl")
    return path
