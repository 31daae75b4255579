"""The `acecap` command line: its options, help and examples, and the dispatch to commands.py."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("acecap")
PREFILL_TOKENS = 16384  # decode.PREFILL_TOKENS, repeated so that --help needs no torch (a test keeps them equal)

EXAMPLES = """\
examples:
  acecap caption song.mp3                       caption with ACE-Step/acestep-captioner (downloaded once)
  acecap caption *.flac -o labels -f txt        also write labels/<name>.caption.txt
  acecap caption song.wav --task lyrics         lyrics with ACE-Step/acestep-transcriber
  acecap caption song.wav --model ./my-model    a local checkpoint folder
  acecap annotate songs/ -o labels              a whole folder, resumable (acecap annotate -h)
  acecap compare --ref cpu:fp32 --cand npu:0:bf16  is this card faithful to the CPU? (acecap compare -h)
  acecap serve --device npu:0 --api-key $KEY    an OpenAI-compatible service on :8000 (acecap serve -h)
  acecap review labels                          listen to, check and correct the labels in the browser
  acecap caption song.wav --device cuda --quant int4   the 7B model on a 12 GB card
  acecap doctor --device npu:0                  check this machine before downloading 22 GB
"""


def finite(text: str) -> float:
    """A number option: NaN and infinity are refused as usage errors (NaN passes every `<` check)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


QUANT_HELP = (
    "quantize the language model's linear layers as the model loads (pip install 'acecap[quant]'): int8 or int4 "
    "weights (the 7B thinker in 9.3 or 6.5 GiB instead of 15.4), fp8 weights and activations on CUDA cards with "
    "FP8 units (Ada, Hopper; fp8 weights only on the CPU). Computes in bf16. Default none"
)


def _model_options(parser: argparse.ArgumentParser, several_tasks: bool = False, device: bool = True) -> None:
    group = parser.add_argument_group("model and device")
    if several_tasks:
        group.add_argument(
            "--tasks",
            default="caption",
            help="comma list of caption (ACE-Step/acestep-captioner), lyrics (ACE-Step/acestep-transcriber: "
            "language and tagged lyrics) and meta (tempo, key, time signature from the signal, no model). "
            "Tasks run one after another, one model in memory at a time. Default: caption",
        )
        group.add_argument("--model", action="append", default=[], metavar="[TASK=]MODEL",
                           help="checkpoint folder or hub id for every model task, or TASK=MODEL for one "
                           "(repeat for each); default: each task's ACE-Step model")  # fmt: skip
    else:
        group.add_argument(
            "--task",
            choices=["caption", "lyrics"],
            default="caption",
            help="caption: describe the music (ACE-Step/acestep-captioner); "
            "lyrics: transcribe them (ACE-Step/acestep-transcriber). Default: caption",
        )
        group.add_argument("--model", help="checkpoint folder, or a hub id (default: the task's ACE-Step model)")
    group.add_argument(
        "--hub",
        choices=["auto", "modelscope", "huggingface"],
        default="auto",
        help="where to download a hub id from; auto tries both caches, then ModelScope, "
        "then Hugging Face. HF_HUB_OFFLINE=1 allows caches only. Default: auto",
    )
    if not device:  # compare names a device and dtype per side, and decodes with the static cache
        return
    group.add_argument(
        "--device", default="auto", help="auto, cpu, cuda[:i], npu[:i] or mps; auto prefers npu > cuda > mps > cpu"
    )
    group.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                       help="weights and activations; auto is bf16 on accelerators, fp32 on cpu")  # fmt: skip
    group.add_argument("--quant", default="none", choices=["none", "int8", "int4", "fp8"], help=QUANT_HELP)
    group.add_argument("--decoder", default="auto", choices=["auto", "static", "compiled", "graphs", "transformers"],
                       help="static: static KV cache, each clip prefilled unpadded; compiled: the same with the "
                       "whole decode step compiled by torch.compile (inductor, and on CUDA replayed as a CUDA "
                       "graph; torchair on Ascend; on CPU ~2 min to compile per kind of batch, then up to 1.8x "
                       "faster decoding in bf16: for long jobs); "
                       "graphs: the static step replayed as a CUDA graph; "
                       "transformers: the library's generate() (slower; the reference). "
                       "Default auto: graphs on CUDA, else static")  # fmt: skip
    group.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, metavar="N",
                       help="most prompt tokens one prefill pass takes: several clips are packed into a pass, a "
                       "longer prompt takes several (bounds the activation memory; a 3-minute song is ~4,500 "
                       f"tokens). Default {PREFILL_TOKENS}")  # fmt: skip


def _generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="replace the task's prompt (e.g. '*Task* Describe this audio in detail')")
    group.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens (default 512)")
    group.add_argument("--temperature", type=finite, default=0.0, help="0 = greedy (default); > 0 samples")
    group.add_argument("--top-p", type=finite, default=1.0, help="nucleus sampling when sampling (default 1.0)")
    group.add_argument("--repetition-penalty", type=finite, default=1.0, help="> 1 discourages loops (default 1.0)")
    group.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    group.add_argument("--max-duration", type=finite, default=300.0,
                       help="caption at most this many seconds of each file; longer files are truncated "
                       "and flagged (default 300, the model's design; up to ~1290 fits the context)")  # fmt: skip
    group.add_argument("--allow-partial", action="store_true",
                       help="caption a file that holds less audio than its header declares (a partial copy or "
                       "download), or that cannot be decoded to its end, as far as it goes, flagged partial; "
                       "without it such a file fails")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acecap",
        description="Label music with the ACE-Step Captioner (descriptions) and Transcriber (lyrics) "
        "on an Ascend NPU, an NVIDIA GPU or the CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("--version", action="version", version=f"acecap {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _caption_parser(commands)
    _annotate_parser(commands)
    _bench_parser(commands)
    _compare_parser(commands)
    _serve_parser(commands)
    _review_parser(commands)
    _quantize_parser(commands)
    _doctor_parser(commands)
    return parser


def _caption_parser(commands) -> None:
    caption = commands.add_parser(
        "caption", help="caption (or transcribe) audio files and print the text",
        description="Print one caption per file on stdout; per-file figures go to stderr. "
        "A file that cannot be read is reported and skipped; the exit status is 1 if any failed.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
    )  # fmt: skip
    caption.add_argument("paths", nargs="+", metavar="PATH", help="audio files: wav, flac, mp3, ogg, opus, m4a, …")
    caption.add_argument("-o", "--output-dir", type=Path, help="also write results into this folder")
    caption.add_argument("-f", "--format", choices=["txt", "json", "jsonl"],
                         help="with -o: txt writes <name>.<task>.txt (ACE-Step reads <name>.caption.txt), "
                         "json writes <name>.<task>.json, jsonl appends to <task>.jsonl. Default: txt")  # fmt: skip
    _model_options(caption)
    _generation_options(caption)


def _annotate_parser(commands) -> None:
    from .acestep import FORMATS

    annotate = commands.add_parser(
        "annotate", help="label whole folders into OUT/annotations.jsonl: batched, resumable, robust",
        description="Label every audio file under the inputs (folders are searched recursively; .txt, .csv "
        "and .jsonl manifests list files) with each of --tasks (a caption, lyrics, tempo/key/metre) into "
        "OUT/annotations.jsonl, one record per file and task; -f acestep also writes the files ACE-Step's "
        "trainer reads. Run the same "
        "command again to finish an interrupted run: finished files are skipped. A file that cannot be "
        "read gets an error record and the run goes on; the exit status is 1 if any file failed.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ANNOTATE_EXAMPLES,
    )  # fmt: skip
    annotate.add_argument("inputs", nargs="+", metavar="INPUT", help="folders, audio files or manifests")
    annotate.add_argument("-o", "--output-dir", type=Path, required=True, help="where annotations.jsonl goes")
    annotate.add_argument("-f", "--format", choices=["txt", *FORMATS], action="append",
                          default=[], help="also write (repeatable): txt, OUT/<relative path>.<task>.txt; acestep, "
                          "song.caption.txt, song.lyrics.txt and song.json beside each song (what ACE-Step's "
                          "trainer reads; values already there are kept unless --overwrite); csv, OUT/dataset.csv "
                          "(File, BPM, Key, Caption); acestep-dataset, OUT/dataset.json (the ACE-Step UI's "
                          "dataset file)")  # fmt: skip
    annotate.add_argument("--sidecars-in", type=Path, metavar="DIR",
                          help="with -f acestep: write the sidecar files under DIR, mirroring the inputs' "
                          "folders, instead of beside each song")  # fmt: skip
    _model_options(annotate, several_tasks=True)
    annotate.add_argument("--devices", help="several devices, one process each: 'all' or a list like npu:0,npu:1 "
                          "(cuda:0,cuda:1; cpu,cpu for testing). Overrides --device")  # fmt: skip
    _generation_options(annotate)
    group = annotate.add_argument_group("dataset")
    group.add_argument(
        "--batch-size",
        type=int,
        help="most clips per batch (default 64 on npu/cuda, 32 on cpu); batches also "
        "stay within half the free device memory for their KV cache",
    )
    group.add_argument(
        "--long-audio",
        choices=["truncate", "segment", "full"],
        default="truncate",
        help="truncate: caption the first --max-duration seconds (default); full: the whole "
        "song up to the context limit; segment: caption consecutive windows",
    )
    group.add_argument("--segment-seconds", type=finite, default=60.0, help="window length for segment (default 60)")
    group.add_argument(
        "--overwrite", action="store_true", help="redo what earlier runs finished; replace values in existing sidecars"
    )
    group.add_argument("--decode-workers", type=int, metavar="N",
                       help="processes decoding and resampling audio ahead of each device (default: the host's "
                       "cores less one per device, shared out among the devices)")  # fmt: skip
    group.add_argument("--shard", metavar="i/N",
                       help="only this machine's share of the files, numbered from 0: 0/N ... (N-1)/N (a Slurm "
                       "array --array=0-7 passes --shard $SLURM_ARRAY_TASK_ID/8; Kubernetes indexed jobs "
                       "$JOB_COMPLETION_INDEX/8)")  # fmt: skip
    group.add_argument("--quiet", action="store_true", help="no progress bar, only warnings and the summary")
    group = annotate.add_argument_group("the meta task (tempo, key, time signature)")
    group.add_argument("--meta-source", default="tags,signal", metavar="SOURCES",
                       help="where tempo and key come from: tags (the file's BPM and key tags: ID3 TBPM/TKEY, "
                       "Vorbis BPM/INITIALKEY, MP4 tmpo/initialkey; Camelot and Open Key read too), signal (estimated "
                       "from the audio), or tags,signal: tags where present, else the signal (default). The time "
                       "signature is never in tags: it comes from the signal (unknown with tags alone)")  # fmt: skip
    group.add_argument("--meta-min-confidence", type=finite, default=0.3, metavar="C",
                       help="in the ACE-Step files (-f acestep, csv, acestep-dataset), write a tempo, key or time "
                       "signature whose confidence is below C as unknown rather than guess; annotations.jsonl keeps "
                       "every value with its confidence and source. 0 writes all (default 0.3)")  # fmt: skip
    group = annotate.add_argument_group("Ray cluster (pip install 'acecap[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster: one actor per NPU or GPU, records written here as they come "
        "back. ADDRESS: auto (the cluster this node joined), ray://HEAD:10001, or nothing for "
        "a local cluster. Input files must be at the same path on every node",
    )
    group.add_argument("--ray-actors", type=int, metavar="N",
                       help="actors to start (default one per card of --device's kind in the cluster; one "
                       "on a CPU-only cluster)")  # fmt: skip


def _bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure speed: time to first token, tok/s, audio-s/s, memory, per decoder and batch size",
        description="Time captioning on one device: every decoder at every batch size, each point after a "
        "warm-up, decoding exactly --tokens tokens per clip. Random weights in a model's shape run at that "
        "model's speed, so --shapes 7b measures the real model without downloading it. Writes bench.json, "
        "bench.md and bench.png (throughput against batch size) into -o.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BENCH_EXAMPLES,
    )  # fmt: skip
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", help="a checkpoint folder or hub id, instead of random weights")
    source.add_argument("--shapes", choices=["7b", "small", "tiny"], default="tiny",
                        help="random weights in this shape (default tiny: a quick check)")  # fmt: skip
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda[:i], npu[:i] or mps")
    bench.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    bench.add_argument("--quant", default="none", choices=["none", "int8", "int4", "fp8"], help=QUANT_HELP)
    bench.add_argument("--decoders", default="auto",
                       help="comma-separated: auto, static, compiled, graphs, transformers")  # fmt: skip
    bench.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    bench.add_argument("--seconds", type=finite, default=30.0, help="audio per clip (default 30)")
    bench.add_argument("--tokens", type=int, default=128, help="tokens decoded per clip, end token ignored")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per point (default 3)")
    bench.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, metavar="N",
                       help=f"most prompt tokens one prefill pass takes (default {PREFILL_TOKENS})")  # fmt: skip
    bench.add_argument("-o", "--output-dir", type=Path, default=Path("bench"), help="report folder (default bench)")


def _compare_parser(commands) -> None:
    compare = commands.add_parser(
        "compare", help="check a device and dtype against a reference: tokens, logits and every layer",
        description="Run one model on two sides (DEVICE:DTYPE, one loaded at a time) over a built-in suite "
        "of generated clips (the seed's 5 s sawtooth, tones, chords, drums, noise, near-silence, a 60 s mix) "
        "plus any files given. Each side generates greedily; then both are fed the reference's tokens, so "
        "next-token distributions (KL, top-1 agreement) and every audio-encoder and language-model layer "
        "(cosine, max error; pass/warn/fail) compare on the same inputs. Writes precision_results.json, "
        "report.md, layer_cosine.png and kl_per_step.png into -o. Exit status: 0 for pass or warn, 1 for "
        "fail (a layer below cosine 0.9 or past its error limit), 2 when it cannot run.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMPARE_EXAMPLES,
    )  # fmt: skip
    compare.add_argument("paths", nargs="*", metavar="PATH",
                         help="audio files or folders to compare on too; or two saved runs (caption -f "
                         "json or jsonl, annotate's annotations.jsonl): their texts, running nothing")  # fmt: skip
    compare.add_argument("--ref", default="cpu:fp32",
                         help="reference side, DEVICE[:DTYPE][:QUANT] (default cpu:fp32)")  # fmt: skip
    compare.add_argument("--cand", default="auto:auto",
                         help="candidate side, DEVICE[:DTYPE][:QUANT], like npu:0:bf16, cpu:bf16 or cuda:bf16:int4 "
                         "(QUANT: int8, int4 or fp8, as --quant; default auto:auto: the best device in its usual "
                         "dtype; cpu:bf16 where the CPU is the best device)")  # fmt: skip
    compare.add_argument("--no-suite", action="store_true", help="only the files given, not the built-in clips")
    compare.add_argument("--max-new-tokens", type=int, default=128, help="tokens each side generates (default 128)")
    compare.add_argument("--save-logits", action="store_true",
                         help="also write both sides' teacher-forced logits to logits.npz (large for the "
                         "real model: steps × 152k floats per clip and side)")  # fmt: skip
    compare.add_argument("-o", "--output-dir", type=Path, default=Path("precision"),
                         help="report folder (default precision)")  # fmt: skip
    _model_options(compare, device=False)


def _serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible captioning service that batches concurrent requests",
        description="Serve POST /v1/chat/completions (audio as input_audio base64 or audio_url), "
        "GET /v1/models, /health and /metrics (Prometheus). Requests arriving together are captioned as one "
        "batch. Text parts of the request replace the task's prompt; greedy unless temperature is given.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EXAMPLES,
    )  # fmt: skip
    _model_options(serve)
    group = serve.add_argument_group("service")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    group.add_argument(
        "--api-key",
        default=os.environ.get("ACECAP_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $ACECAP_API_KEY; none)",
    )
    group.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the model's name in /v1/models and answers (the first), and the names requests may "
                       "use (default: the hub id, or the model folder's name; never its path)")  # fmt: skip
    group.add_argument(
        "--max-batch-size",
        type=int,
        help="most requests captioned together (default 64 on npu/cuda, 32 on cpu; 1 turns "
        "batching off); batches also stay within half the free device memory",
    )
    group.add_argument(
        "--max-wait-ms",
        type=finite,
        default=10.0,
        help="how long an idle device waits for more requests to join the first (default 10)",
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for the device; more get 503 with Retry-After (default 256)",
    )
    group.add_argument("--max-body-mb", type=finite, default=100.0, help="largest request body (default 100 MiB)")
    group.add_argument(
        "--max-duration",
        type=finite,
        default=300.0,
        help="longest audio in seconds; longer gets 413 (default 300, the model's design)",
    )
    group.add_argument(
        "--max-new-tokens", type=int, default=512, help="default and largest max_tokens of a request (default 512)"
    )
    group.add_argument(
        "--timeout",
        type=finite,
        default=600.0,
        help="seconds from a request's arrival to its last token; then 504 (default 600)",
    )
    group.add_argument(
        "--allow-files",
        type=Path,
        metavar="DIR",
        help="let audio_url name file:// paths inside DIR (symlinks and .. resolved first); off by default",
    )
    group.add_argument("--allow-urls", action="store_true",
                       help="let audio_url name http(s) URLs the server fetches (off by default: the server "
                       "would fetch whatever a client names); hosts that are not public are refused")  # fmt: skip
    group.add_argument("--allow-private-urls", nargs="*", metavar="CIDR",
                       help="with --allow-urls, fetch also from private, loopback, link-local and reserved "
                       "addresses: those in the networks given (e.g. 10.0.0.0/8), or any without one")  # fmt: skip
    group.add_argument("--fetch-timeout", type=finite, default=60.0,
                       help="seconds to read a file:// or http(s) audio_url; then 504 (default 60)")  # fmt: skip
    group.add_argument("--max-fetch-mb", type=finite, default=100.0,
                       help="largest file:// or http(s) audio_url; larger gets 413 (default 100 MiB)")  # fmt: skip
    group.add_argument("--fetch-workers", type=int, default=32,
                       help="threads reading file:// and http(s) audio, apart from those checking and decoding "
                       "requests (default 32)")  # fmt: skip


def _review_parser(commands) -> None:
    from .acestep import FORMATS

    review = commands.add_parser(
        "review", help="listen to an annotate job's files and check and correct their labels in the browser",
        description="Serve a local web page over an annotate output folder: a table of every file (sort, "
        "filter, search) and a page per file with its audio, waveform and spectrogram, and every label "
        "editable. Saves go to OUT/reviews.jsonl (append-only; annotations.jsonl is never changed) and into "
        "the ACE-Step files that exist (sidecars beside the songs, OUT/dataset.csv, OUT/dataset.json); "
        "annotate -f keeps them on later runs. With --export, write the reviewed songs and exit instead.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REVIEW_EXAMPLES,
    )  # fmt: skip
    review.add_argument("output_dir", type=Path, metavar="OUT", help="an annotate output folder")
    group = review.add_argument_group("service")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; anything else needs a token)")  # fmt: skip
    group.add_argument("--port", type=int, default=0, help="port (default 0: any free port, printed)")
    group.add_argument("--api-key", default=os.environ.get("ACECAP_API_KEY"),
                       help="the token every request needs (default: $ACECAP_API_KEY; off a loopback address "
                       "without one, a new token is made and printed in the URL)")  # fmt: skip
    group.add_argument("--open", action="store_true", help="open the page in this machine's browser")
    group = review.add_argument_group("export (instead of serving)")
    group.add_argument("--export", choices=["approved", "all"],
                       help="write the approved songs (or all, reviews applied) in each -f format, "
                       "then exit")  # fmt: skip
    group.add_argument("-f", "--format", choices=list(FORMATS), action="append", default=[],
                       help="with --export (repeatable): acestep, sidecars beside each song (values already "
                       "there are kept); csv, dataset.csv; acestep-dataset, dataset.json")  # fmt: skip
    group.add_argument("--export-to", type=Path, metavar="DIR",
                       help="where dataset.csv and dataset.json go (default OUT)")  # fmt: skip
    group.add_argument("--meta-min-confidence", type=finite, metavar="C",
                       help="with --export: a tempo, key or time signature no person changed whose confidence is "
                       "below C is written as unknown, as annotate writes it (default 0.3)")  # fmt: skip


def _quantize_parser(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="write a pre-quantized copy of a checkpoint that loads fast",
        description="Load MODEL with its language model's linear layers quantized, on --device, and write DIR: "
        "the quantized weights (quantized.pt, loaded with weights_only and mmap), quantization.json, and the "
        "checkpoint's config, processor and tokenizer files. --model DIR then loads it as it is (no 16-bit "
        "weights read, nothing quantized again) on the same kind of device: int4 is packed for the device kind "
        "it was made on. Needs pip install 'acecap[quant]'.",
    )  # fmt: skip
    quantize.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    quantize.add_argument("-o", "--output-dir", type=Path, required=True, help="where to write the folder")
    quantize.add_argument("--quant", required=True, choices=["int8", "int4", "fp8"], help=QUANT_HELP)
    quantize.add_argument("--device", default="auto", help="the kind of device the folder is for (default auto)")
    quantize.add_argument("--hub", choices=["auto", "modelscope", "huggingface"], default="auto",
                          help="where to download a hub id from (default auto)")  # fmt: skip


def _doctor_parser(commands) -> None:
    doctor = commands.add_parser(
        "doctor", help="print the environment and run a tiny model end to end",
        description="Print Python, torch, torch_npu/CANN, transformers and the devices with their free memory, "
        "then caption a generated clip with a tiny random model on the chosen device: a check of the "
        "install that needs no download.",
    )  # fmt: skip
    doctor.add_argument("--device", default="auto", help="device to test (default auto)")
    doctor.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])


BENCH_EXAMPLES = """\
examples:
  acecap bench --device cpu                                   a quick check with the tiny shape
  acecap bench --device cuda --shapes 7b --batch-sizes 1,16,64 the real model's shapes, bf16
  acecap bench --device npu:0 --shapes 7b                     the same on an Ascend card
  acecap bench --device cuda --shapes 7b --quant fp8          FP8 weights and activations
  acecap bench --model ./acestep-captioner --seconds 60       a real checkpoint
"""


COMPARE_EXAMPLES = """\
examples:
  acecap compare --ref cpu:fp32 --cand npu:0:bf16          is this Ascend card faithful to the CPU?
  acecap compare --ref cpu:fp32 --cand cpu:bf16 songs/     what bf16 costs, on the suite and your songs
  acecap compare --ref cuda:fp32 --cand cuda:bf16 --model ./acestep-captioner -o precision-gpu
  acecap compare --ref cpu:fp32 --cand cpu:bf16:int8       what int8 weights cost
  acecap compare --ref cuda:bf16 --cand cuda:bf16:fp8      what FP8 costs on a Hopper card
  acecap compare laptop/annotations.jsonl npu-server/annotations.jsonl   two saved runs, texts only
"""


SERVE_EXAMPLES = """\
examples:
  acecap serve                                       the captioner on http://127.0.0.1:8000/v1
  acecap serve --device npu:0 --host 0.0.0.0 --api-key $KEY
  acecap serve --task lyrics --port 8001             the transcriber beside it
  acecap serve --allow-files /data/music             clients may name file:///data/music/... as audio_url
  acecap serve --model ./acestep-captioner --served-model-name ACE-Step/acestep-captioner
                                                     a local copy under the hub id clients send
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d @request.json
"""


REVIEW_EXAMPLES = """\
examples:
  acecap review labels                             a page on http://127.0.0.1:PORT/ (printed)
  acecap review labels --port 8100 --open          a fixed port, opened in the browser
  acecap review labels --host 0.0.0.0              reachable from other machines: prints a URL with a token
  acecap review labels --export approved -f acestep-dataset   labels/dataset.json of the approved songs
"""


ANNOTATE_EXAMPLES = """\
examples:
  acecap annotate songs/ -o labels                 everything under songs/ into labels/annotations.jsonl
  acecap annotate songs/ -o labels -f txt          also labels/<relative path>.caption.txt
  acecap annotate songs/ -o labels --tasks caption,lyrics,meta -f acestep
                                                   an ACE-Step training set: sidecars beside each song
  acecap annotate list.csv -o labels --devices all one process per NPU or GPU
  acecap annotate songs/ -o labels --shard 3/8     this machine's eighth of the files
  acecap annotate /nfs/songs -o labels --ray auto  every NPU or GPU of the Ray cluster this node joined
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("acecap")
    except PackageNotFoundError:
        return "unknown"


def _lowercase_level(record: logging.LogRecord) -> bool:
    record.levelname = record.levelname.lower()
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C while the libraries load, before a command could take it
        print("acecap: error: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    quiet = getattr(args, "quiet", False) or args.command not in ("annotate", "serve")
    logging.basicConfig(format="acecap: %(levelname)s: %(message)s", level=logging.WARNING if quiet else logging.INFO)
    logging.getLogger().handlers[0].addFilter(_lowercase_level)
    # transformers' own notices (talker config checks, deprecations) mean nothing to a captioning user.
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    if quiet or args.command == "annotate":  # its "Loading weights" bar too (annotate draws its own)
        transformers_logging.disable_progress_bar()
    # Expected failures (bad device, no model, bad option) end in one line and exit 2; bugs keep their traceback.
    from .commands import (
        annotate_command,
        bench_command,
        caption_command,
        compare_command,
        quantize_command,
        say_error,
        serve_command,
    )
    from .devices import DeviceError
    from .hub import ModelNotFound
    from .inputs import ManifestError
    from .model import CheckpointError

    try:
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(args.device, args.dtype)
        if args.command == "annotate":
            return annotate_command(args)
        if args.command == "bench":
            return bench_command(args)
        if args.command == "compare":
            return compare_command(args)
        if args.command == "quantize":
            return quantize_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "review":
            from .commands import review_command

            return review_command(args)
        return caption_command(args)
    except (DeviceError, ModelNotFound, CheckpointError, ManifestError, ValueError, OSError) as error:
        say_error(str(error))
        return 2
    except KeyboardInterrupt:
        say_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
