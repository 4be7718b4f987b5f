"""How a benchmark keeps its results: one JSON file (under ``bench/results/``), written whole.

Imported by the bench scripts as ``save`` (each runs with ``bench/`` first on its path)::

    from save import save_results
    save_results(Path("bench/results/bus.json"), results)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def save_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write ``results`` as indented JSON to ``path``, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
