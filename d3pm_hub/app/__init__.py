"""The Gradio app: erase and restore digits live (``service`` samples and caches, ``ui`` is the interface)."""

from .service import DEFAULT_DELTAS_FOLDER, EraserService, GridResult, GridSettings, discover_deltas
from .ui import API_NAME, build_demo, launch

__all__ = [
    "API_NAME",
    "DEFAULT_DELTAS_FOLDER",
    "EraserService",
    "GridResult",
    "GridSettings",
    "build_demo",
    "discover_deltas",
    "launch",
]
