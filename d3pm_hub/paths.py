"""Where the shipped artefacts live (inside the repository, next to the package)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = REPO_ROOT / "pretrained"
DEFAULT_PIPELINE = PRETRAINED / "d3pm-mnist"
