"""Hugging Face hub ids where keel takes a checkpoint or tokenizer directory (model.checkpoint, model.tokenizer,
--checkpoint): resolved to the snapshot directory in huggingface_hub's local cache."""

from __future__ import annotations

import os
from pathlib import Path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def resolve_checkpoint(name: str | Path, what: str = "model.checkpoint") -> Path:
    """A local directory, or a Hugging Face hub id ("org/name") resolved to its snapshot in huggingface_hub's
    local cache (HF_HUB_CACHE / HF_HOME). A hub id that is not cached is downloaded, unless HF_HUB_OFFLINE is
    set: then it is a FileNotFoundError saying so. `what` names the setting in messages."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: {name} is a file, not a checkpoint directory")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{what}: {name} does not exist (neither a directory nor a Hugging Face hub id)") \
            from None
    if os.environ.get("HF_HUB_CACHE"):
        cache = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    else:
        cache = None
    try:
        return Path(snapshot_download(text, cache_dir=cache, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - LocalEntryNotFoundError and its kin: not (fully) cached
        cached_error = err
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = cache or constants.HF_HUB_CACHE
    if offline:
        raise FileNotFoundError(
            f"{what}: {text!r} is not a local directory, and the Hugging Face hub id {text!r} is not in the local "
            f"cache {where} (HF_HUB_OFFLINE is set, so nothing is downloaded): download it where the hub is "
            f"reachable (`hf download {text}`, same HF_HOME) or give a directory "
            f"({_one_line(cached_error)})") from None
    try:
        return Path(snapshot_download(text, cache_dir=cache))
    except Exception as err:  # noqa: BLE001 - network, authentication, no such repository
        raise FileNotFoundError(f"{what}: {text!r} is not a local directory, not in the Hugging Face cache {where}, "
                                f"and downloading it failed: {_one_line(err)}") from None
