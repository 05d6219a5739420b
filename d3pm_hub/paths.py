"""Where the shipped artefacts live (inside the repository, next to the package), and how files are written."""

import os
import shutil
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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def replace_folder(temporary: Path, final: Path) -> Path:
    """Move the complete folder ``temporary`` to ``final``, replacing any folder there, never losing both.

    An existing ``final`` is first renamed aside to ``.old-{name}`` and deleted only once ``temporary`` is in place:
    a crash in between leaves the old folder there (renames within one file system are atomic; two folders cannot
    be swapped in one step portably).
    """
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    temporary.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
