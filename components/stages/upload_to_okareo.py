"""Stage `upload_to_okareo`: the splits as Okareo scenarios and each model's predictions as Okareo test runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftloop.components.config import RunConfig
from ftloop.components.generators.okareo import upload_evaluation
from ftloop.components.records import write_json


def run(config: RunConfig, eval_dirs: dict[str, str | Path], links_path: str | Path) -> dict[str, dict[str, str]]:
    """Upload, then write the Okareo links (model -> split -> URL) as the task's artifact."""
    links: dict[str, Any] = upload_evaluation(config.generators.okareo, config.name, eval_dirs)
    write_json(links_path, links)
    return links
