"""Where the training records come from: one dataset (``--data``) or a mixture of several (``--mix``).

A mixture entry is ``PATH key=value ...``. ``weight`` scales the dataset's size (0.5: a seeded half of its
records, 2: every record twice), ``examples`` asks for an exact count (repeating records when it exceeds the
dataset); without either every record is used once. ``template``, ``split``, ``subset`` and ``columns`` (its
field renames, comma-separated or the key repeated: ``columns=question=instruction columns=answer=output``;
default: ``data.columns``) apply to that dataset only. The draw depends on the seed and the entry's position, never on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zerotune.config import DataConfig
from zerotune.data.formats import parse_columns
from zerotune.data.templates import check_template_name
from zerotune.errors import ConfigError

MIX_KEYS = ("weight", "examples", "template", "split", "subset", "columns")


@dataclass(frozen=True)
class Source:
    """One dataset of the run, with its own template and how many examples it contributes."""

    path: str
    template: str
    split: str = "train"
    subset: str = ""
    weight: float | None = None
    examples: int | None = None
    columns: tuple[str, ...] | None = None  # its own renames ('source=target'); None: data.columns

    def renames(self, config: DataConfig) -> dict[str, str]:
        """The field renames of this dataset: its mixture entry's, else data.columns."""
        if self.columns is None:
            return parse_columns(config.columns)
        return parse_columns(list(self.columns), f"data.mix entry {self.path!r} columns", "its columns=...")

    @property
    def takes_all(self) -> bool:
        """Every record once, in file order (no weight or examples asked)."""
        return self.examples is None and self.weight is None

    @property
    def name(self) -> str:
        return self.path or "the bundled sample"

    def draw(self, num_records: int, seed: int, position: int) -> list[int]:
        """Indices of the records this dataset contributes, in file order within each pass."""
        if self.takes_all:
            return list(range(num_records))
        count = self.examples if self.examples is not None else round(self.weight * num_records)
        whole_passes, rest = divmod(count, num_records)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * (position + 1))
        sample = sorted(torch.randperm(num_records, generator=generator)[:rest].tolist())
        return list(range(num_records)) * whole_passes + sample


def training_sources(config: DataConfig) -> list[Source]:
    if not config.mix:
        return [Source(config.path, config.template, config.split, config.subset)]
    if config.path:
        raise ConfigError("data.path and data.mix: pass --data for one dataset or --mix for several, not both")
    return [parse_mix_entry(entry, index, config) for index, entry in enumerate(config.mix)]


def parse_mix_entry(entry: str, index: int, config: DataConfig) -> Source:
    key = f"data.mix[{index}] {entry!r}"
    path, *settings = entry.split()
    if "=" in path:
        raise ConfigError(f"{key}: starts with a setting; write the dataset path first, e.g. 'data/a.jsonl weight=2'")
    values: dict[str, str] = {}
    renames: list[str] = []
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals or name not in MIX_KEYS:
            raise ConfigError(f"{key}: {setting!r} is not one of {', '.join(k + '=...' for k in MIX_KEYS)}")
        if name == "columns":  # repeatable: on the command line, commas separate mixture entries
            renames += [item for item in value.split(",") if item]
        values[name] = value
    if "weight" in values and "examples" in values:
        raise ConfigError(f"{key}: give weight or examples, not both")
    weight = _number(values, "weight", float, key) if "weight" in values else None
    examples = _number(values, "examples", int, key) if "examples" in values else None
    if weight is not None and not 0 < weight < float("inf"):
        raise ConfigError(f"{key}: weight must be a number above 0, got {values['weight']}")
    if examples is not None and examples < 1:
        raise ConfigError(f"{key}: examples must be 1 or more, got {examples}")
    template = values.get("template", config.template)
    check_template_name(template)
    columns = tuple(renames) if "columns" in values else None
    if columns is not None:
        parse_columns(list(columns), f"{key} columns", "write columns=question=instruction,answer=output")
    return Source(path, template, values.get("split", config.split), values.get("subset", config.subset),
                  weight, examples, columns)


def _number(values: dict[str, str], name: str, kind: type, key: str):
    try:
        return kind(values[name])
    except ValueError:
        raise ConfigError(f"{key}: {name}={values[name]} is not {'an integer' if kind is int else 'a number'}") \
            from None
