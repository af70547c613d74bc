"""Turn records into token ids with labels on the response only (prompt tokens get -100).

EOS is appended to every response and carries a label, so the model learns to stop. Labels are built
here, never derived from ``input_ids == pad_token_id``, so this holds when pad == eos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zerotune.data.templates import get_alpaca_template, template_for_record
from zerotune.errors import DataError

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed rows: restarts at 0 for each example

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class EncodeReport:
    """What happened to the records, logged at the start of a run."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    templates: dict[str, int] = field(default_factory=dict)
    fewest_to_keep: int = 0  # of the dropped examples, the smallest max_seq_len that keeps one (0: none dropped)
    sources: list[str] = field(default_factory=list)  # of a mixture: per dataset, what it contributed
    unit: str = "examples"  # or "pairs" (zerotune.data.pairs)

    def merge(self, other: "EncodeReport") -> None:
        self.total += other.total
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped += other.dropped
        self.fewest_to_keep = min(filter(None, (self.fewest_to_keep, other.fewest_to_keep)), default=0)
        self.unit = other.unit
        for name, count in other.templates.items():
            self.templates[name] = self.templates.get(name, 0) + count

    def summary(self) -> str:
        used = ", ".join(f"{name}: {count}" for name, count in sorted(self.templates.items()))
        mixture = f"; mixture: {'; '.join(self.sources)}" if self.sources else ""
        return (
            f"{self.kept} of {self.total} {self.unit} kept ({self.truncated} truncated, {self.dropped} dropped "
            f"as too long); templates {used}{mixture}"
        )


def encode_alpaca(tokenizer, record: dict[str, Any], template_name: str) -> EncodedExample:
    template = get_alpaca_template(template_name)
    prompt = template.render_prompt(record["instruction"], record.get("input") or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return EncodedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)


def encode_chat(tokenizer, record: dict[str, Any]) -> EncodedExample:
    """Render with the tokenizer's chat template; label only what each assistant turn adds."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use --template alpaca or a chat model's tokenizer")
    messages = record["messages"]
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        else:
            before = None
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if before is not None:
            _extend(tokenizer, before[len(rendered):], input_ids, labels, learn=False, first=not input_ids)
            _extend(tokenizer, upto[len(before):], input_ids, labels, learn=True, first=False)
        else:
            _extend(tokenizer, upto[len(rendered):], input_ids, labels, learn=False, first=not input_ids)
        rendered = upto
    if input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return EncodedExample(input_ids, labels)


def _extend(tokenizer, text: str, input_ids: list[int], labels: list[int], learn: bool, first: bool) -> None:
    if not text:
        return
    # A BOS token comes from the template text itself when the template has one.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids.extend(ids)
    labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))


def encode_records(tokenizer, records, where, template: str | list[str], max_seq_len: int, overlong: str,
                   keep_dropped: bool = False):
    """Encode all records with one configured template, or one per record (a mixture's). Returns (examples,
    report); raises DataError if none survive. With keep_dropped, dropped records stay in the list as None
    (positions preserved) and nothing raises."""
    report = EncodeReport(total=len(records))
    examples = []
    templates = [template] * len(records) if isinstance(template, str) else template
    names = [template_for_record(record, configured) for record, configured in zip(records, templates)]
    for name in names:
        report.templates[name] = report.templates.get(name, 0) + 1
    for example in _encode_in_batches(tokenizer, records, names):
        example, outcome, needed = fit(example, max_seq_len, overlong)
        if outcome == DROPPED:
            report.dropped += 1
            report.fewest_to_keep = min(filter(None, (report.fewest_to_keep, needed)))
            if keep_dropped:
                examples.append(None)
            continue
        report.truncated += int(outcome == TRUNCATED)
        examples.append(example)
    report.kept = sum(example is not None for example in examples)
    if keep_dropped:
        return examples, report
    if not examples:
        raise all_dropped_error(report, max_seq_len, overlong)
    return examples, report


KEPT, TRUNCATED, DROPPED = 0, 1, 2


def fit(example: EncodedExample, max_seq_len: int, overlong: str) -> tuple[EncodedExample | None, int, int]:
    """One example fitted to max_seq_len: (the example or None, KEPT/TRUNCATED/DROPPED, and for a dropped one the
    smallest max_seq_len that keeps it)."""
    if len(example.input_ids) <= max_seq_len:
        return example, KEPT, 0
    cut = EncodedExample(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
    if overlong == "drop" or cut.num_label_tokens == 0:  # with truncate: the prompt alone fills the window
        return None, DROPPED, len(example.input_ids) if overlong == "drop" else _first_label(example) + 1
    return cut, TRUNCATED, 0


BATCH_RECORDS = 1024
PARALLEL_FROM = 4096  # fewer records than this are tokenized in one process: starting workers costs more


def map_processes(num_rows: int) -> int | None:
    """datasets' num_proc for a map over ``num_rows`` rows: the CPUs this process may use (at most 8), or None
    (this process) below PARALLEL_FROM rows."""
    import os

    workers = min(8, len(os.sched_getaffinity(0))) if num_rows >= PARALLEL_FROM else 1
    return workers if workers > 1 else None


def encode_table(tokenizer, source, read, template: str, max_seq_len: int, overlong: str, cache_file: str,
                 num_proc: int | None = None):
    """encode_records' examples of one dataset, tokenized by datasets' batched map over ``num_proc`` processes
    (default: the CPUs this process may use, at most 8) into an Arrow file, never into Python lists in this
    process. ``source``: the dataset's RecordTable (zerotune.data.records); ``read(batch, indices)``: the checked
    records of a batch of its rows. Returns (the table: input_ids, labels and per record the template used,
    KEPT/TRUNCATED/DROPPED and what keeping a dropped one needs; its report)."""
    import uuid

    import datasets

    def encode(batch, indices):
        rows = read(batch, indices)
        names = [template_for_record(record, template) for record in rows]
        columns = {"input_ids": [], "labels": [], "template": names, "outcome": [], "needed": []}
        for example in _encode_in_batches(tokenizer, rows, names):
            example, outcome, needed = fit(example, max_seq_len, overlong)
            columns["input_ids"].append(example.input_ids if example else [])
            columns["labels"].append(example.labels if example else [])
            columns["outcome"].append(outcome)
            columns["needed"].append(needed)
        return columns

    rows = source.rows
    num_proc = map_processes(len(rows)) if num_proc is None else num_proc if num_proc > 1 else None
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32")),
                                  "template": datasets.Value("string"), "outcome": datasets.Value("int8"),
                                  "needed": datasets.Value("int32")})
    # new_fingerprint: the cache key is zerotune's (zerotune.data.cache), so datasets need not hash the tokenizer
    table = rows.map(encode, batched=True, with_indices=True, batch_size=BATCH_RECORDS,
                     num_proc=num_proc, remove_columns=rows.column_names,
                     features=features, cache_file_name=cache_file, new_fingerprint=uuid.uuid4().hex,
                     desc="tokenizing")
    return table, table_report(table)


def table_report(table) -> EncodeReport:
    """encode_records' report, counted from encode_table's columns."""
    import pyarrow.compute as compute

    outcome = table.data.column("outcome").to_numpy()
    needed = table.data.column("needed").to_numpy()[outcome == DROPPED]
    counts = compute.value_counts(table.data.column("template")).to_pylist()
    return EncodeReport(total=len(table), kept=int((outcome != DROPPED).sum()),
                        truncated=int((outcome == TRUNCATED).sum()), dropped=int((outcome == DROPPED).sum()),
                        templates={row["values"]: row["counts"] for row in counts},
                        fewest_to_keep=int(needed.min()) if len(needed) else 0)


def _encode_in_batches(tokenizer, records, names):
    """Encoded examples in record order. Alpaca records are tokenized a batch at a time (one call of the fast
    tokenizer per batch of prompts and of responses: the same ids as encode_alpaca, without a call per record)."""
    for start in range(0, len(records), BATCH_RECORDS):
        batch = range(start, min(start + BATCH_RECORDS, len(records)))
        alpaca = [i for i in batch if names[i] not in ("tokens", "chat")]
        encoded = dict(zip(alpaca, encode_alpaca_batch(tokenizer, [records[i] for i in alpaca],
                                                         [names[i] for i in alpaca])))
        for index in batch:
            record, name = records[index], names[index]
            if name == "tokens":  # pre-tokenized: taken as is; labels default to the inputs
                yield EncodedExample(list(record["input_ids"]), list(record.get("labels") or record["input_ids"]))
            elif name == "chat":
                yield encode_chat(tokenizer, record)
            else:
                yield encoded[index]


def encode_alpaca_batch(tokenizer, records: list[dict[str, Any]], names: list[str]) -> list[EncodedExample]:
    if not records:
        return []
    prompts = [get_alpaca_template(name).render_prompt(record["instruction"], record.get("input") or "")
               for record, name in zip(records, names)]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer([record["output"] for record in records], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [EncodedExample(prompt + response + [eos], [IGNORE_INDEX] * len(prompt) + response + [eos])
            for prompt, response in zip(prompt_ids, response_ids)]


def _first_label(example: EncodedExample) -> int:
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


def all_dropped_error(report: EncodeReport, max_seq_len: int, overlong: str) -> DataError:
    """What helps depends on the policy: under drop, truncating would keep them; under truncate (the default)
    their prompts alone fill the window, so only a longer window or shorter prompts help."""
    raise_to = f"raise --max-seq-len (to at least {report.fewest_to_keep} to keep one)"
    if overlong == "drop":
        return DataError(f"all {report.total} {report.unit} are longer than data.max_seq_len={max_seq_len} tokens; "
                         f"{raise_to}, shorten the data, or pass --overlong truncate to cut them")
    return DataError(f"all {report.total} {report.unit} have prompts that fill data.max_seq_len={max_seq_len} tokens, "
                     f"leaving no response token to learn; {raise_to} or shorten the prompts")
