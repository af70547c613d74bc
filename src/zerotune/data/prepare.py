"""From config to encoded train and eval examples; the same code runs in preflight and in every worker."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zerotune.config import DataConfig
from zerotune.data.encode import EncodedExample, EncodeReport, encode_records
from zerotune.data.records import check_records, read_records
from zerotune.data.templates import check_template_name


@dataclass
class PreparedData:
    train: list[EncodedExample]
    eval: list[EncodedExample]
    report: EncodeReport


def load_and_check(config: DataConfig, path: str):
    check_template_name(config.template)
    records, where = read_records(path, config.split)
    check_records(records, where, config.template, path)
    return records, where


def prepare_data(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    records, where = load_and_check(config, config.path)
    examples, report = encode_records(tokenizer, records, where, config.template, config.max_seq_len, config.overlong)
    if config.eval_path:
        eval_records, eval_where = load_and_check(config, config.eval_path)
        eval_examples, _ = encode_records(
            tokenizer, eval_records, eval_where, config.template, config.max_seq_len, config.overlong
        )
        return PreparedData(examples, eval_examples, report)
    if config.eval_fraction == 0 or len(examples) < 2:
        return PreparedData(examples, [], report)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, round(config.eval_fraction * len(examples)))
    eval_set = set(order[:held_out])
    train = [example for index, example in enumerate(examples) if index not in eval_set]
    evaluation = [examples[index] for index in sorted(eval_set)]
    return PreparedData(train, evaluation, report)
