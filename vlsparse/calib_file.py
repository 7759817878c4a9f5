"""The ``--calib FILE.jsonl`` format shared by ``profile``, ``prune`` and ``calibrate``.

One JSON object per line (blank lines are skipped), either an image-text entry

    {"images": ["a.png", "b.png"], "prompt": "...", "answer": "..."}
    {"image": "a.png", "question": "..."}                 # same thing, short form

(``answer`` is optional; ``question`` is an alias of ``prompt``), or a text entry

    {"text": "Some English prose ..."}
    {"text_file": "chapter1.txt"}

Relative paths are relative to the JSONL file. Every malformed line is an
``InputError`` naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlsparse.errors import InputError

EXAMPLE = '{"images": ["a.png"], "prompt": "Describe it."} or {"text": "..."}'


@dataclass(frozen=True)
class CalibEntry:
    """One line of a calibration file: image paths + prompt (+ answer), or plain text."""

    where: str
    images: list[Path] = field(default_factory=list)
    prompt: str = ""
    answer: str = ""
    text: str = ""

    @property
    def is_text(self) -> bool:
        return not self.images and not self.prompt


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, or a one-line error."""
    if not path.is_file():
        raise InputError(f"calibration text file {path} not found", "check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"calibration file {path} is not UTF-8 text", "give a .txt or .jsonl file") from exc


def _entry(path: Path, number: int, row: object) -> CalibEntry:
    where = f"{path.name} line {number}"
    if not isinstance(row, dict):
        raise InputError(f"{where} is not a JSON object", "write one JSON object per line")
    images = row.get("images", [row["image"]] if "image" in row else [])
    prompt = row.get("prompt", row.get("question"))
    if images or prompt is not None:
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise InputError(f"{where}: `images` should be a list of paths", "fix that line")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where} has images but no `prompt`", "add a prompt string")
        paths = [Path(p) if Path(p).is_absolute() else path.parent / p for p in images]
        return CalibEntry(where, paths, prompt, str(row.get("answer", "") or ""))
    text = row.get("text")
    if text is None and "text_file" in row:
        text = read_text_file(path.parent / str(row["text_file"]))
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where} has none of images/prompt/text/text_file", f"write e.g. {EXAMPLE}")
    return CalibEntry(where, text=text)


def read_entries(path: Path, limit: int | None = None) -> list[CalibEntry]:
    """The first ``limit`` entries (all if None) of a calibration JSONL file."""
    text = read_text_file(path)
    out: list[CalibEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path.name} line {number} is not valid JSON ({exc.msg})",
                             "write one JSON object per line") from exc
        out.append(_entry(path, number, row))
    if not out:
        raise InputError(f"calibration file {path} holds no entries", f"add lines like {EXAMPLE}")
    return out
