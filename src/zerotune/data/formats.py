"""Bring records of other shapes to the ones the templates read: renamed columns (``data.columns``), ShareGPT
``conversations`` turned into chat ``messages``, and a configured system prompt put first in chat records.

Runs after reading and before the checks, so every later step (checks, templates, encoding) sees one shape.
"""

from __future__ import annotations

from typing import Any

from zerotune.errors import ConfigError, DataError

# ShareGPT speakers, as written by the common exports (FastChat, Vicuna, LLaMA-Factory's sharegpt format).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


def parse_columns(items: list[str], key: str = "data.columns", how: str = "flag --columns") -> dict[str, str]:
    """``['question=instruction', 'answer=output']`` -> {'question': 'instruction', 'answer': 'output'}. ``key``
    and ``how`` name where the renames were given in an error."""
    mapping: dict[str, str] = {}
    for item in items:
        source, equals, target = (part.strip() for part in item.partition("="))
        if not equals or not source or not target:
            raise ConfigError(f"{key}: {item!r} is not source=target; write e.g. question=instruction ({how})")
        if source in mapping:
            raise ConfigError(f"{key}: column {source!r} is mapped twice; map each source column once")
        mapping[source] = target
    targets = list(mapping.values())
    repeated = next((target for target in targets if targets.count(target) > 1), None)
    if repeated:
        raise ConfigError(f"{key}: two columns are mapped to {repeated!r}; map one source column to each field")
    return mapping


def normalize_records(records: list[Any], where: list[str], columns: dict[str, str],
                      system_prompt: str) -> list[Any]:
    """New records with columns renamed, ShareGPT conversations as messages and the system prompt added.
    Anything that is not an object is passed through for check_records to name."""
    return [_normalize(record, place, columns, system_prompt) if isinstance(record, dict) else record
            for record, place in zip(records, where)]


def _normalize(record: dict[str, Any], place: str, columns: dict[str, str], system_prompt: str) -> dict[str, Any]:
    if columns:
        record = {columns.get(name, name): value for name, value in record.items()}
    if "conversations" in record and "messages" not in record:
        messages = sharegpt_messages(record["conversations"], place)
        record = {name: value for name, value in record.items() if name != "conversations"} | {"messages": messages}
    if system_prompt and isinstance(record.get("messages"), list) and record["messages"]:
        first = record["messages"][0]
        if not (isinstance(first, dict) and first.get("role") == "system"):
            record = {**record, "messages": [{"role": "system", "content": system_prompt}, *record["messages"]]}
    return record


def sharegpt_messages(conversations: Any, place: str) -> list[dict[str, str]]:
    """ShareGPT turns ({"from": "human"|"gpt"|"system"|"user"|"assistant", "value": text}) as chat messages."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f'{place}: field "conversations" must be a non-empty list of {{"from": ..., "value": ...}} '
                        "turns")
    messages = []
    for index, turn in enumerate(conversations):
        where = f"{place}: conversations[{index}] (turn {index + 1})"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f'{where} needs "from" and "value" (ShareGPT turns look like '
                            '{"from": "human", "value": "..."})')
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}: unknown speaker {turn['from']!r}; use human, gpt or system (or user, "
                            "assistant)")
        if not isinstance(turn["value"], str):
            raise DataError(f'{where}: "value" must be text, got {type(turn["value"]).__name__}')
        if role == "system" and index != 0:
            raise DataError(f"{where}: a system turn must come first")
        messages.append({"role": role, "content": turn["value"]})
    return messages
