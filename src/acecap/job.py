"""What an annotate run is: the Job (the same fields as the command line) and the constants its parts share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .decode import PREFILL_TOKENS
from .generate import Decoding
from .model import TASKS

LONG_AUDIO = ("truncate", "segment", "full")
CHUNK_FILES = 64  # at most this many files a worker takes from the queue at a time
ALL_TASKS = (*TASKS, "meta")  # meta: tempo, key and metre from the signal, no model


@dataclass
class Job:
    """Everything that defines an annotate run; the same fields as the command line."""

    inputs: list[str]
    output_dir: Path
    task: str = "caption"
    model: str | None = None
    hub: str = "auto"
    devices: list[str] = field(default_factory=lambda: ["auto"])
    dtype: str = "auto"
    decoder: str = "auto"
    quant: str = "none"
    prompt: str | None = None
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int | None = None
    long_audio: str = "truncate"
    max_duration: float = 300.0
    segment_seconds: float = 60.0
    overwrite: bool = False
    write_txt: bool = False
    allow_partial: bool = False  # caption what a file holds when it is shorter than its header says
    shard: tuple[int, int] | None = None
    ray: str | None = None  # a Ray cluster's address ("auto", "ray://host:10001"), or "" for a local one
    ray_actors: int | None = None  # None: one per accelerator in the cluster (one on a CPU-only cluster)
    meta_sources: tuple[str, ...] = ("tags", "signal")  # meta: where tempo and key come from, tags first
    decode_workers: int | None = None  # audio decoding processes per device; None: the host's cores shared out
    prefill_tokens: int = PREFILL_TOKENS  # prompt tokens per prefill pass

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.task not in ALL_TASKS:
            raise ValueError(f"unknown task {self.task!r}: use {', '.join(ALL_TASKS)}")
        if self.long_audio not in LONG_AUDIO:
            raise ValueError(f"unknown --long-audio {self.long_audio!r}: use {', '.join(LONG_AUDIO)}")
        for flag, seconds in (("--segment-seconds", self.segment_seconds), ("--max-duration", self.max_duration)):
            if not seconds > 0:  # NaN too
                raise ValueError(f"{flag} {seconds:g}: give a length in seconds above 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.decode_workers is not None and self.decode_workers < 1:
            raise ValueError("--decode-workers must be at least 1")
        if self.prefill_tokens < 1:
            raise ValueError("--prefill-tokens must be at least 1")
        if not self.meta_sources or set(self.meta_sources) - {"tags", "signal"}:
            raise ValueError(f"meta sources {self.meta_sources!r}: use tags, signal or both")

    @property
    def model_name(self) -> str:
        """The model as records name it: an absolute folder, a hub id, or the analysis library (meta)."""
        if self.task == "meta":
            from .meta import ESTIMATOR

            return f"{ESTIMATOR} ({','.join(self.meta_sources)})"
        name = self.model or TASKS[self.task].model_id
        return str(Path(name).resolve()) if Path(name).is_dir() else name

    @property
    def prompt_text(self) -> str:
        return "" if self.task == "meta" else self.prompt or TASKS[self.task].prompt
