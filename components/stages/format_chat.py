"""Stage `format_chat`: format splits as conversational prompt/completion rows (TRL's format).

The completion is the bare label, so the loss falls on a few tokens and the
label can be scored in one forward pass at evaluation time.
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.artifacts import chat_rows, labels_path, split_path, write_labels
from ftloop.components.config import RunConfig
from ftloop.components.records import SPLITS, content_hash, write_jsonl
from ftloop.components.stages.split_examples import read_splits


def run(config: RunConfig, split_dir: str | Path, out_dir: str | Path) -> dict:
    """Stage entry point: each split's rows as conversational prompt/completion data."""
    system_prompt = config.format.system_prompt
    splits, labels = read_splits(split_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_jsonl(split_path(out, name), chat_rows((e.to_dict() for e in splits[name]), labels, system_prompt))
    write_labels(out, labels)
    return {
        **{f"{name}_rows": len(splits[name]) for name in SPLITS},
        "labels": len(labels),
        "format": "conversational prompt/completion",
        "content_hash": content_hash([split_path(out, name) for name in SPLITS] + [labels_path(out)]),
    }
