"""Resolving a local folder or a Hugging Face Hub repo id to files on disk (safetensors, json, cards only)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

SAFE_PATTERNS = ("*.json", "*.safetensors", "*.md")


def resolve_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is, or a Hub repo id downloaded (safetensors/json/md only) into the HF cache.

    With ``HF_HUB_OFFLINE=1`` only the cache is consulted, and a missing repo fails at once.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path_or_repo_id).count("/") > 1:
        raise FileNotFoundError(f"{path_or_repo_id!s} is neither a folder nor a Hub repo id ('org/name').")
    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=list(SAFE_PATTERNS)))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{path_or_repo_id!s} is not a local folder and is not in the Hugging Face cache "
            "(offline mode or no network). Download it first or pass a local path."
        ) from error
