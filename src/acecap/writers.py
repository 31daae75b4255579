"""Result files: written whole or not at all, so a crash never leaves a half file that looks done."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename over it (text as UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines in one write and flush them to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


def check_unique_names(paths: list[str]) -> None:
    """Outputs are named after the input's file name; two inputs with one name would overwrite each other."""
    seen: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem
        if stem in seen and seen[stem] != path:
            raise ValueError(f"{seen[stem]} and {path} would write the same output files; caption them separately")
        seen[stem] = path


def write_result(result, output_dir: Path, fmt: str) -> Path:
    """txt: <name>.<task>.txt; json: <name>.<task>.json; jsonl: one line appended to <task>.jsonl."""
    stem = Path(result.source).stem
    if fmt == "txt":
        path = output_dir / f"{stem}.{result.task}.txt"
        atomic_write(path, result.text + "\n")
    elif fmt == "json":
        path = output_dir / f"{stem}.{result.task}.json"
        atomic_write(path, json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n")
    elif fmt == "jsonl":
        path = output_dir / f"{result.task}.jsonl"
        append_lines(path, [json.dumps(result.to_dict(), ensure_ascii=False)])
    else:
        raise ValueError(f"unknown format {fmt!r}: use txt, json or jsonl")
    return path
