"""What each `acecap` command does with its parsed arguments: call the Python API, print, pick the exit status."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .inputs import shown

log = logging.getLogger("acecap")


def _shard(text: str | None) -> tuple[int, int] | None:
    """`i/N`, numbered from 0 as Slurm arrays (--array=0-7) and Kubernetes indexed jobs number their tasks."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 < int(count)):
        raise ValueError(f"--shard {text!r}: use i/N with 0 <= i < N, like 0/4")
    if int(index) >= int(count):
        raise ValueError(f"--shard {text}: shards are numbered from 0, so the last of {count} is "
                         f"{int(count) - 1}/{count}; from a 1-based index use --shard $((i - 1))/{count}")  # fmt: skip
    return int(index), int(count)


def annotate_command(args: argparse.Namespace) -> int:
    from .acestep import check_collisions, export
    from .annotate import annotate
    from .devices import device_kind, expand_devices
    from .hub import check_model
    from .inputs import discover
    from .job import ALL_TASKS, Job
    from .progress import summary_table
    from .records import latest_per_input, load_records, settled
    from .reviews import reviewed_edits

    tasks = _tasks(args.tasks, ALL_TASKS)
    if args.sidecars_in and "acestep" not in args.format:
        raise ValueError("--sidecars-in says where -f acestep writes its sidecars: give -f acestep with it")
    _check_confidence(args.meta_min_confidence)
    models = _models(args.model, [task for task in tasks if task != "meta"])
    for model in models.values() if args.ray is None else ():  # a Ray cluster's nodes may hold folders this one lacks
        check_model(model)  # a folder that is not a checkpoint ends the command now, not in each worker
    devices = [args.device] if args.ray is not None else expand_devices(args.devices or args.device)
    if args.decoder == "graphs" and args.ray is None and models:
        kinds = sorted({device_kind(device) for device in devices} - {"cuda"})
        if kinds:
            raise ValueError(f"--decoder graphs needs a CUDA device, not {', '.join(kinds)}")
    if args.prompt and sum(task != "meta" for task in tasks) > 1:
        raise ValueError("--prompt replaces one task's prompt: give it with a single model task")
    shard, decoding, meta_sources = _shard(args.shard), _decoding(args), _meta_sources(args.meta_source)
    for flag, value in (("--decode-workers", args.decode_workers), ("--prefill-tokens", args.prefill_tokens)):
        if value is not None and value < 1:  # as Job says, but before discovery reads any input
            raise ValueError(f"{flag} must be at least 1")
    items = discover(args.inputs)  # missing inputs and clashing outputs end the command here, before any work
    check_collisions([(item.path, item.relative) for item in items], args.format, args.sidecars_in)
    # What the records said before this run: in a folder acecap kept no ledger of its sidecars in, the values
    # acecap wrote from them are its own to replace.
    before = latest_per_input(load_records(args.output_dir)) if "acestep" in args.format else []
    ok = True
    for task in tasks:
        job = Job(
            inputs=args.inputs,
            output_dir=args.output_dir,
            task=task,
            model=models.get(task),
            hub=args.hub,
            devices=["cpu"] if task == "meta" else devices,
            dtype=args.dtype,
            decoder=args.decoder,
            quant=args.quant,
            prompt=args.prompt,
            decoding=decoding,
            batch_size=args.batch_size,
            long_audio=args.long_audio,
            max_duration=args.max_duration,
            segment_seconds=args.segment_seconds,
            overwrite=args.overwrite,
            write_txt="txt" in args.format,
            allow_partial=args.allow_partial,
            shard=shard,
            ray=args.ray,
            ray_actors=args.ray_actors,
            meta_sources=meta_sources,
            decode_workers=args.decode_workers,
            prefill_tokens=args.prefill_tokens,
        )
        if len(tasks) > 1:
            log.info("task %s", task)
        summary = annotate(job, progress=not args.quiet)
        print(f"{task}:\n{summary_table(summary)}", file=sys.stderr)
        ok &= summary.ok
        if summary.interrupted:
            print(f"records: {args.output_dir / 'annotations.jsonl'} (interrupted)", file=sys.stderr)
            # After a second Ctrl-C a worker thread may still be inside the model's kernels, and exiting the
            # interpreter around it aborts (C++ terminate): leave at once, the records are merged on disk.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    print(f"records: {args.output_dir / 'annotations.jsonl'}", file=sys.stderr)
    formats = [f for f in args.format if f != "txt"]
    if formats:
        relative = {os.path.abspath(item.path): item.relative for item in items}
        reviews = reviewed_edits(args.output_dir)  # a person's corrections (acecap review) win over the machine's
        with settled(args.output_dir) as records:  # shards finishing at once export one after the other
            written, failed = export(records, relative, formats, args.output_dir, args.sidecars_in, args.overwrite,
                                     reviews, args.meta_min_confidence, before)  # fmt: skip
        print(f"ACE-Step files written: {len(written)}", file=sys.stderr)
        for path, reason in failed:
            say_error(f"{path}: not written: {reason}")
        ok &= not failed
    return 0 if ok else 1


def _check_confidence(value: float) -> float:
    """--meta-min-confidence, in [0, 1] (annotate and review --export)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--meta-min-confidence {value}: use a confidence from 0 to 1")
    return value


def _meta_sources(text: str) -> tuple[str, ...]:
    sources = tuple(dict.fromkeys(source.strip() for source in text.split(",") if source.strip()))
    if not sources or set(sources) - {"tags", "signal"}:
        raise ValueError(f"--meta-source {text!r}: use tags, signal or tags,signal")
    return sources


def _tasks(text: str, known: tuple[str, ...]) -> list[str]:
    tasks = [task.strip() for task in text.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in known]
    if unknown or not tasks:
        raise ValueError(f"--tasks {text!r}: use a comma list of {', '.join(known)}")
    return list(dict.fromkeys(tasks))


def _models(values: list[str], tasks: list[str]) -> dict[str, str]:
    """--model MODEL (every model task) and --model TASK=MODEL (one task)."""
    models: dict[str, str] = {}
    for value in values:
        task, sep, model = value.partition("=")
        if sep and task in ("caption", "lyrics"):
            models[task] = model
        elif sep and "/" not in task and not os.path.exists(value):
            raise ValueError(f"--model {value}: {task!r} is not a task; use caption=MODEL or lyrics=MODEL")
        else:
            models.update({task: value for task in tasks})
    return models


def _decoding(args: argparse.Namespace):
    from .generate import Decoding

    return Decoding(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def say_error(message: str) -> None:
    print(f"acecap: error: {message}", file=sys.stderr)


def _figures(result) -> str:
    t = result.timings
    flags = " [truncated]" if result.truncated else ""
    flags += " [cut at --max-new-tokens]" if not result.finished else ""
    flags += f" [partial: {result.partial}]" if result.partial else ""
    return (f"{shown(result.source)}: {result.duration:.1f} s audio, {result.tokens} tokens, "
            f"first token {t.first_token_s * 1000:.0f} ms, {t.decode_tokens_per_s:.1f} tok/s, "
            f"audio decode {t.audio_s * 1000:.0f} ms{flags}")  # fmt: skip


def _load_captioner(args: argparse.Namespace, prompt: str | None = None):
    """The model the command's model and device options name, announced on stderr once loaded."""
    from .captioner import Captioner
    from .devices import dtype_name

    captioner = Captioner.from_pretrained(args.model, task=args.task, device=args.device, dtype=args.dtype,
                                          hub=args.hub, prompt=prompt, decoder=args.decoder,
                                          quant=args.quant, prefill_tokens=args.prefill_tokens)  # fmt: skip
    quant = f", {captioner.quant} weights" if captioner.quant != "none" else ""
    print(f"acecap: {captioner.model_name} on {captioner.device} ({dtype_name(captioner.dtype)}{quant}), "
          f"loaded in {captioner.load_s:.1f} s", file=sys.stderr)  # fmt: skip
    return captioner


def caption_command(args: argparse.Namespace) -> int:
    """Each file alone: one that cannot be read, captioned or written is reported, and the rest go on (exit 1).
    Only the model and its device stop the command (exit 2)."""
    from .audio import AudioError, load_audio
    from .writers import check_unique_names, check_writable, write_result

    decoding = _decoding(args)
    if args.format and not args.output_dir:
        raise ValueError(f"-f {args.format} says what -o DIR receives: give -o DIR")
    if not args.max_duration > 0:
        raise ValueError(f"--max-duration {args.max_duration:g}: give a length in seconds above 0")
    fmt = args.format or "txt"
    if args.output_dir:
        if fmt != "jsonl":  # jsonl appends every file's line to one file: names cannot clash
            check_unique_names(args.paths)
        check_writable(args.output_dir)
    captioner = None
    failures = 0
    for path in args.paths:
        start = time.perf_counter()
        try:
            clip = load_audio(path, max_seconds=args.max_duration, allow_partial=args.allow_partial)
        except AudioError as error:
            say_error(f"{shown(path)}: {error}")
            failures += 1
            continue
        except Exception as error:  # a decoder's bug on one file
            say_error(f"{shown(path)}: cannot decode: {type(error).__name__}: {error}")
            failures += 1
            continue
        audio_s = time.perf_counter() - start
        if captioner is None:  # loaded once a first file decodes: bad inputs alone never cost a model load
            captioner = _load_captioner(args, args.prompt)
        try:
            result = captioner.caption_clips([clip], decoding, max_duration=args.max_duration, audio_s=[audio_s])[0]
            if len(args.paths) > 1:
                print(f"# {shown(path)}")
            print(result.text, flush=True)
            print(_figures(result), file=sys.stderr)
            if args.output_dir:
                write_result(result, args.output_dir, fmt)
        except (OSError, RuntimeError) as error:  # this file's output, or its batch on the device
            say_error(f"{shown(path)}: {error}")
            failures += 1
    return 1 if failures else 0


def _numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: use numbers like 1,8,32") from None
    if min(values) < 1:
        raise ValueError("--batch-sizes must be at least 1")
    return values


def bench_command(args: argparse.Namespace) -> int:
    from .bench import bench

    report = bench(
        model=args.model,
        shape=args.shapes,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        decoders=args.decoders.split(","),
        batch_sizes=_numbers(args.batch_sizes),
        seconds=args.seconds,
        tokens=args.tokens,
        repeats=args.repeats,
        prefill_tokens=args.prefill_tokens,
        output_dir=args.output_dir,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(f"report: {args.output_dir / 'bench.md'} (with bench.json and bench.png)")
    return 1 if any(run.get("error") for run in report["runs"]) else 0


def compare_command(args: argparse.Namespace) -> int:
    from .audio import AudioError, load_audio
    from .compare import builtin_suite, check_both_fit, choose_sides, compare, compare_results
    from .generate import Decoding
    from .inputs import discover
    from .precision_report import failed_in_candidate, verdict, write_report, write_text_report

    saved = [Path(p) for p in args.paths if Path(p).suffix in (".json", ".jsonl")]
    if saved:  # two runs made elsewhere: compare what they saved
        if len(saved) != 2 or len(args.paths) != 2:
            raise ValueError("to compare saved runs give exactly two result files: REFERENCE.json CANDIDATE.json")
        results, missing = compare_results(*saved)
        line = write_text_report(results, missing, *saved, args.output_dir)
        # The candidate failing a file the reference did is a difference too: the one a saved run can show.
        status = int(failed_in_candidate(missing) > 0)
    else:
        reference, candidate = choose_sides(args.ref, args.cand)
        clips = [] if args.no_suite else builtin_suite()
        for item in discover(args.paths):
            try:
                clips.append(load_audio(item.path))
            except AudioError as error:
                say_error(f"{item.path}: {error}; left out")
        if not clips:
            raise ValueError("nothing to compare: give audio files, or leave out --no-suite")
        check_both_fit(args.model, reference, candidate, args.task, args.hub)
        decoding = Decoding(max_new_tokens=args.max_new_tokens)
        results, runs = compare(args.model, reference, candidate, clips, decoding, args.task, args.hub)
        line = write_report(results, reference, candidate, runs, args.output_dir, args.save_logits)
        status = 1 if verdict(results) == "fail" else 0
    print(line, file=sys.stderr)
    print(f"report: {args.output_dir / 'report.md'}", file=sys.stderr)
    return status


def quantize_command(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .hub import resolve_model
    from .model import write_quantized
    from .quant import WEIGHTS_FILE

    device = resolve_device(args.device)
    start = time.perf_counter()
    folder = write_quantized(resolve_model(args.model, args.hub), args.output_dir, args.quant, device)
    size = (folder / WEIGHTS_FILE).stat().st_size / 2**30
    print(f"acecap: {args.model} quantized to {args.quant} for {device.type} in {time.perf_counter() - start:.1f} s: "
          f"{folder} ({size:.1f} GiB); use it with --model {folder}", file=sys.stderr)  # fmt: skip
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from .fetch import AudioAccess
    from .serve import ServeConfig, check_address, serve

    if args.allow_files is not None and not args.allow_files.is_dir():
        raise ValueError(f"--allow-files {args.allow_files}: not a folder")
    if args.allow_private_urls is not None and not args.allow_urls:
        raise ValueError("--allow-private-urls widens --allow-urls: give both")
    private = ("0.0.0.0/0", "::/0") if args.allow_private_urls == [] else tuple(args.allow_private_urls or ())
    access = AudioAccess(files=args.allow_files, urls=args.allow_urls, private_networks=private,
                         max_bytes=int(args.max_fetch_mb * 2**20), timeout_s=args.fetch_timeout)  # fmt: skip
    config = ServeConfig(
        api_key=args.api_key or None,
        served_model_name=tuple(args.served_model_name or ()),
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        max_duration=args.max_duration,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        fetch_workers=args.fetch_workers,
        access=access,
    )
    check_address(args.host, args.port)
    serve(_load_captioner(args), config, args.host, args.port)
    return 0


def review_command(args: argparse.Namespace) -> int:
    if args.export is None:
        if args.format or args.export_to or args.meta_min_confidence is not None:
            raise ValueError("-f, --export-to and --meta-min-confidence go with --export approved|all")
        from .review import review

        review(args.output_dir, args.host, args.port, args.api_key or None, args.open)
        return 0
    from .reviews import export_reviewed

    confidence = _check_confidence(0.3 if args.meta_min_confidence is None else args.meta_min_confidence)
    written, failed = export_reviewed(args.output_dir, args.export, args.format, args.export_to, confidence)
    print(f"ACE-Step files written: {len(written)}", file=sys.stderr)
    for path in written:
        print(path)
    for path, reason in failed:
        say_error(f"{path}: not written: {reason}")
    return 1 if failed else 0
