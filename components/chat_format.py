"""Format splits as conversational prompt/completion rows (TRL's format).

The completion is the bare label, so the loss falls on a few tokens and the
label can be scored in one forward pass at evaluation time.
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.prompts import chat_row
from ftloop.components.records import SPLITS, content_hash, write_json, write_jsonl
from ftloop.components.split import read_splits


def run_format(split_dir: str | Path, out_dir: str | Path, system_prompt: str | None = None) -> dict:
    splits, labels = read_splits(split_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", (chat_row(e.to_dict(), labels, system_prompt) for e in splits[name]))
    write_json(out / "labels.json", labels)
    return {
        **{f"{name}_rows": len(splits[name]) for name in SPLITS},
        "labels": len(labels),
        "format": "conversational prompt/completion",
        "content_hash": content_hash([out / f"{name}.jsonl" for name in SPLITS] + [out / "labels.json"]),
    }
