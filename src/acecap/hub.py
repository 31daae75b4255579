"""Model id → local folder: a folder on disk, ModelScope or Hugging Face, caches first."""

from __future__ import annotations

import os
from pathlib import Path

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


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def resolve_model(model: str, hub: str = "auto") -> Path:
    """Return a local folder holding `model`, downloading it if needed.

    `model` is a folder, or a hub id like `ACE-Step/acestep-captioner`. With hub `auto`, existing
    caches of both hubs are tried first, then a download from ModelScope (where the seed got it), then
    from Hugging Face.
    """
    if hub not in HUBS:
        raise ModelNotFound(f"unknown hub {hub!r}: use auto, modelscope or huggingface")
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"{folder} is a folder but holds no config.json: not a model checkpoint")
        return folder
    if not _is_hub_id(model):
        raise ModelNotFound(f"model folder {model} does not exist (a hub id looks like ACE-Step/acestep-captioner)")

    hubs = ["modelscope", "huggingface"] if hub == "auto" else [hub]
    for name in hubs:  # caches first: a copy on disk never needs the network
        try:
            return FETCHERS[name](model, local_only=True)
        except Exception:  # each hub signals a cache miss with its own exception type
            pass
    advice = f"download it elsewhere and pass --model /path/to/folder (a copy of the {model} repository)"
    if offline():
        raise ModelNotFound(
            f"{model} is in neither the ModelScope nor the Hugging Face cache, and HF_HUB_OFFLINE is set; {advice}"
        )
    failures = []
    for name in hubs:
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
