"""Reading an operator's JSON file (a tenant key or weights file, a split cost profile) with
one clear error for each way it can be unusable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, what: str) -> Any:
    """The JSON value in the file at `path`; ValueError naming `what` and the path when the
    file is missing or unreadable, or not valid JSON (UTF-8)."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None
