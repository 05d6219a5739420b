"""Where the shipped artefacts live (inside the repository, next to the package), and how files are written."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = REPO_ROOT / "pretrained"
DEFAULT_PIPELINE = PRETRAINED / "d3pm-mnist"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` whole or not at all: ``write(temporary)`` fills a temp file in the same folder, then
    ``os.replace`` renames it (readers never see a partial file; a failed write leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
