"""How long an audio file says it is, and where its audio really ends, without decoding it.

libsndfile reports a WAV or AIFF as long as the frames it finds, whatever the header says, so those headers
are read here. An MP3 declares its length only in a Xing/Info or VBRI frame; without one libsndfile and
FFmpeg estimate it from the file's size, which a cut file matches. FFmpeg's packets (read, not decoded)
tell where a file's audio ends.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HEAD_BYTES = 1 << 16  # where WAV, AIFF and MP3 headers are looked for
# PyAV formats whose duration is written in the header (mp4's moov, Matroska's Duration, ASF's header);
# for others (ADTS aac, …) FFmpeg estimates it from the bitrate, which a cut file would match.
DECLARING_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "asf"}


@contextmanager
def pyav_open(source: Path | bytes) -> Iterator:
    """A PyAV container over the path or bytes; a name that is not UTF-8 is read through a file object,
    since PyAV takes names as UTF-8 text."""
    import av

    if isinstance(source, bytes):
        with av.open(io.BytesIO(source)) as container:
            yield container
        return
    try:
        str(source).encode("utf-8")
    except UnicodeEncodeError:
        with open(source, "rb") as handle, av.open(handle) as container:
            yield container
        return
    with av.open(str(source)) as container:
        yield container


def bytes_at(source: Path | bytes, offset: int, count: int) -> bytes:
    """`count` bytes from `offset` of a file or of bytes in memory."""
    if isinstance(source, bytes):
        return source[offset : offset + count]
    with open(source, "rb") as handle:
        handle.seek(offset)
        return handle.read(count)


def pcm_declared_frames(head: bytes) -> int | None:
    """Frames a WAV (RIFF, RIFX, RF64) or AIFF header declares: libsndfile counts only those present."""
    kind, form = head[:4], head[8:12]
    if kind == b"FORM" and form in (b"AIFF", b"AIFC"):
        order, want = ">", b"COMM"
    elif kind in (b"RIFF", b"RF64", b"RIFX") and form == b"WAVE":
        order, want = ("<" if kind != b"RIFX" else ">"), b"data"
    else:
        return None
    block_align, data64, at = 0, None, 12
    while at + 8 <= len(head):
        name, size = head[at : at + 4], struct.unpack(order + "I", head[at + 4 : at + 8])[0]
        body = head[at + 8 : at + 8 + min(size, 64)]
        if name == b"COMM" and want == b"COMM" and len(body) >= 6:
            return struct.unpack(">I", body[2:6])[0]
        if name == b"ds64" and len(body) >= 16:
            data64 = struct.unpack("<Q", body[8:16])[0]
        if name == b"fmt " and len(body) >= 14:
            block_align = struct.unpack(order + "H", body[12:14])[0]
        if name == b"data" and want == b"data":
            size = data64 if size == 0xFFFFFFFF and data64 is not None else size
            # 0 or 0xFFFFFFFF: a writer that streamed and never went back to fill the size in.
            return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
        at += 8 + size + (size & 1)
    return None


def mp3_declares_length(source: Path | bytes) -> bool:
    """Whether an MP3 has a Xing/Info or VBRI header (its frame count). Without one, its length is only an
    estimate from its size and first bitrate, which a cut file matches and a VBR file may miss."""
    head = bytes_at(source, 0, 10)
    offset = 0
    if head[:3] == b"ID3" and len(head) == 10:  # skip an ID3v2 tag: syncsafe size, plus a footer if flagged
        offset = 10 + sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
        offset += 10 if head[5] & 0x10 else 0
    frame = bytes_at(source, offset, 4096)
    start = frame.find(b"\xff")
    window = frame[start : start + 200] if start >= 0 else b""
    return any(tag in window for tag in (b"Xing", b"Info", b"VBRI"))


def packet_end(packet, stream) -> float | None:
    if packet.pts is None:
        return None
    return float((packet.pts + (packet.duration or 0)) * stream.time_base)


def measured_end(source: Path | bytes, start_s: float = 0.0) -> float | None:
    """Where the audio's packets end, read without decoding them (from `start_s`, when the format seeks);
    None when no packet can be read there."""
    import av

    end = None
    try:
        with pyav_open(source) as container:
            stream = container.streams.audio[0]
            if start_s > 0:
                container.seek(int(start_s / stream.time_base), stream=stream)
            for packet in container.demux(stream):
                found = packet_end(packet, stream)
                end = found if end is None or (found is not None and found > end) else end
    except (av.error.FFmpegError, IndexError, ValueError, OSError):
        pass  # a cut file's last packet fails to read: the end is the last one read
    return end
