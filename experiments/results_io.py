"""Where an experiment script writes its JSON: the path given to `--json`, else $OUT/<name> when
OUT is set (the device tool's output folder), else nowhere.

    path = results_io.json_path(args.json, "bench_draw.json")
    results_io.write_json(path, res)   # no-op when path is None
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def json_path(given: Optional[str], name: str) -> Optional[str]:
    """`given`, else $OUT/name when OUT is set, else None."""
    if given:
        return given
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None


def write_json(path: Optional[str], obj: Any) -> None:
    """obj as indented JSON at `path` (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
