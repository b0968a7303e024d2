"""The one place prompts are built, so training and inference can never drift apart."""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = "Classify the customer question into exactly one intent. Answer with the intent name only. Intents: {labels}."

Message = dict[str, str]


def system_instruction(labels: list[str], template: str | None = None) -> str:
    return (template or DEFAULT_SYSTEM_PROMPT).replace("{labels}", ", ".join(labels))


def prompt_messages(text: str, labels: list[str], template: str | None = None) -> list[Message]:
    """Chat prompt for one question: short system instruction + the question as the user turn."""
    return [
        {"role": "system", "content": system_instruction(labels, template)},
        {"role": "user", "content": text},
    ]


def completion_messages(label: str) -> list[Message]:
    return [{"role": "assistant", "content": label}]


def chat_row(example: dict[str, Any], labels: list[str], template: str | None = None) -> dict[str, Any]:
    """A conversational prompt/completion row (TRL's format), keeping provenance fields."""
    return {
        "id": example["id"],
        "text": example["text"],
        "label": example["label"],
        "group": example["group"],
        "origin": example.get("origin"),
        "prompt": prompt_messages(example["text"], labels, template),
        "completion": completion_messages(example["label"]),
    }
