"""Reading the JSON-object files a model directory or a profile holds (config.json, generation_config.json,
tokenizer_config.json, ...), with errors that name the file and what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: str | Path, error: type[Exception], what: str = "") -> dict[str, Any]:
    """The JSON object in the UTF-8 file `path`; `error` ("{what}{path}: ...") where the file is missing or
    unreadable, not UTF-8, not JSON (the line), or JSON of another type than an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what}{path}: no such file") from None
    except OSError as e:
        raise error(f"{what}{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{what}{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{what}{path}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise error(f"{what}{path}: expected a JSON object, got {type(d).__name__}")
    return d
