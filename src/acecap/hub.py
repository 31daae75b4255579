"""Model id → local folder: a folder on disk, ModelScope or Hugging Face, caches first."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

HUBS = ("auto", "modelscope", "huggingface")
TRUTHY = {"1", "true", "yes", "on"}


class ModelNotFound(RuntimeError):
    """The model could not be found locally or downloaded; the message says what to do."""


def offline() -> bool:
    """True when the user asked for no network: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE.

    ModelScope (1.40) has no offline variable of its own, so these govern both hubs.
    """
    return any(
        os.environ.get(name, "").strip().lower() in TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _is_hub_id(model: str) -> bool:
    """Hub ids are `owner/name`; anything else is meant as a folder."""
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def _from_modelscope(model_id: str, local_only: bool) -> Path:
    from modelscope import snapshot_download

    return Path(snapshot_download(model_id, local_files_only=local_only))


def _from_huggingface(model_id: str, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, local_files_only=local_only))


FETCHERS = {"modelscope": _from_modelscope, "huggingface": _from_huggingface}


def endpoint(hub: str) -> str:
    """The address each hub's client downloads from, as its own variables set it."""
    if hub == "huggingface":
        return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn"
    return url if "://" in url else f"https://{url}"


def reachable(url: str, timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens: seconds to find out, not the clients' retry minutes."""
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
    except (OSError, UnicodeError):
        return False
    return True


@contextmanager
def _quiet_hub_clients():
    """ModelScope logs each retry as a warning of its own; acecap reports the outcome once."""
    loggers = [logging.getLogger(name) for name in ("modelscope", "modelscope_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _short(error: Exception, limit: int = 160) -> str:
    """The error's first line and sentence, whole words only: clients append pages of context after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(first) > limit:
        first = first[:limit].rsplit(" ", 1)[0] + " …"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def check_model(model: str) -> None:
    """Raise ModelNotFound at once for a model that is neither a checkpoint folder nor a hub id (a hub id is
    looked up when it loads)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"{folder} is a folder but holds no config.json: not a model checkpoint")
    elif not _is_hub_id(model):
        raise ModelNotFound(f"model folder {model} does not exist (a hub id looks like ACE-Step/acestep-captioner)")


def resolve_model(model: str, hub: str = "auto") -> Path:
    """Return a local folder holding `model`, downloading it if needed.

    `model` is a folder, or a hub id like `ACE-Step/acestep-captioner`. With hub `auto`, existing
    caches of both hubs are tried first, then a download from ModelScope (where the seed got it), then
    from Hugging Face.
    """
    if hub not in HUBS:
        raise ModelNotFound(f"unknown hub {hub!r}: use auto, modelscope or huggingface")
    check_model(model)
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder

    hubs = ["modelscope", "huggingface"] if hub == "auto" else [hub]
    with _quiet_hub_clients():
        for name in hubs:  # caches first: a copy on disk never needs the network
            try:
                return FETCHERS[name](model, local_only=True)
            except Exception:  # each hub signals a cache miss with its own exception type
                pass
    advice = (
        f"pass --model /path/to/folder (a copy of the {model} repository), or try acecap without a download: "
        "python -m acecap.tiny /tmp/tiny, then --model /tmp/tiny (random weights); acecap doctor checks this machine"
    )
    if offline():
        raise ModelNotFound(
            f"{model} is in neither the ModelScope nor the Hugging Face cache, and HF_HUB_OFFLINE is set; {advice}"
        )
    online = [name for name in hubs if reachable(endpoint(name))]
    if not online:
        hosts = [urlparse(endpoint(name)).netloc for name in hubs]
        unreached = f"neither {hosts[0]} nor {hosts[1]} can" if len(hosts) == 2 else f"{hosts[0]} cannot"
        raise ModelNotFound(f"{model} is not on this machine, and {unreached} be reached (offline?); {advice}")
    failures = []
    with _quiet_hub_clients():
        for name in online:
            try:
                return FETCHERS[name](model, local_only=False)
            except Exception as error:  # network, authentication or missing-repo errors differ per client version
                failures.append(f"{name}: {_short(error)}")
    raise ModelNotFound(f"could not download {model} ({'; '.join(failures)}); {advice}")


def revision_of(folder: Path) -> str | None:
    """The commit of a hub snapshot folder (…/snapshots/<revision>), or None for a plain folder."""
    return folder.name if folder.parent.name == "snapshots" else None


def served_name(model: str) -> str:
    """The name a server shows for `model`, never a path: a hub id as given; for a folder, the hub id its
    place in a hub cache tells (a Hugging Face snapshot, a ModelScope cache folder), else the folder's name."""
    if _is_hub_id(model):
        return model
    folder = Path(model).expanduser().resolve()
    repository = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repository.startswith("models--") and repository.count("--") >= 2:
        return repository.removeprefix("models--").replace("--", "/", 1)
    cache = Path(os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope/hub")).expanduser().resolve()
    if folder.is_relative_to(cache):
        inside = folder.relative_to(cache).parts
        if inside[:1] == ("models",):
            inside = inside[1:]
        if len(inside) == 2:  # owner/name; ModelScope writes a name's dots as "___"
            return "/".join(inside).replace("___", ".")
    return folder.name
