"""What the scale and GPU benchmarks write: one JSON line on stdout and the same result, indented,
in ``--out``, with a description of the machine it ran on (BENCHMARKS.md "Scale")."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU cores, architecture, torch version and torch's thread count, for every result file."""
    import torch

    return {"cpu_cores": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def write_result(out: str | os.PathLike | None, result: dict[str, Any]) -> None:
    """Print ``result`` as one JSON line and, when ``out`` is given, write it there (folders made)."""
    print(json.dumps(result, sort_keys=True))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
