"""``zerotune data preview``: the first examples of the first epoch, as the training loop receives them.

The same preparation as training (read, check, mixture draw, template, truncation or drop, eval hold-out,
packing), with only the tokenizer loaded. Text whose tokens carry labels (what the loss is computed on) is
wrapped in LEARN_OPEN/LEARN_CLOSE; packed rows show where one example ends and the next begins.
"""

from __future__ import annotations

from zerotune.config import RunConfig
from zerotune.data.batches import BatchPlan
from zerotune.data.encode import IGNORE_INDEX, EncodedExample

LEARN_OPEN, LEARN_CLOSE = "«", "»"
EXAMPLE_BREAK = " ┊ "  # between the examples of a packed row


def render_example(tokenizer, example: EncodedExample) -> str:
    """The example's text, decoded in runs of tokens that do or do not carry labels; learned runs are marked."""
    starts = {i for i, position in enumerate(example.position_ids or []) if position == 0 and i > 0}
    pieces, run, learned = [], [], None
    for index, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        learns = label != IGNORE_INDEX
        if run and (learns != learned or index in starts):
            pieces.append(_decode(tokenizer, run, learned))
            run = []
        if index in starts:
            pieces.append(EXAMPLE_BREAK)
        run.append(token)
        learned = learns
    if run:
        pieces.append(_decode(tokenizer, run, learned))
    return "".join(pieces)


def _decode(tokenizer, ids: list[int], learned: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{LEARN_OPEN}{text}{LEARN_CLOSE}" if learned else text


def preview(config: RunConfig, count: int, show_ids: bool = False) -> str:
    from zerotune.data.prepare import check_data, prepare_data
    from zerotune.model import check_model_source, load_tokenizer

    if config.objective.name != "sft":
        from zerotune.errors import ConfigError

        raise ConfigError(f"zerotune data preview shows SFT examples; it does not render preference pairs yet "
                          f"(--objective {config.objective.name})")
    check_data(config.data, config.train.seed)  # data errors before the tokenizer is even read
    check_model_source(config.model)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    plan = BatchPlan(len(data.train), config.train.batch_size, config.train.grad_accum,
                     config.distributed.num_workers, config.train.seed)
    order = plan.epoch_order(0)[:count]  # the global order does not depend on the worker count
    kind = "packed row" if data.packing else "example"
    lines = []
    for shown, index in enumerate(order, start=1):
        example = data.train[index]
        learned = example.num_label_tokens
        lines.append(f"--- {kind} {shown} of {len(order)} (training set position {index}): "
                     f"{len(example.input_ids)} tokens, {learned} with labels ---")
        lines.append(render_example(tokenizer, example))
        if show_ids:
            lines.append(f"input_ids: {example.input_ids}")
            lines.append(f"labels:    {example.labels}")
    lines.append("---")
    lines.append(f"data: {data.report.summary()}; {len(data.train)} train / {len(data.eval)} eval "
                 f"{'rows' if data.packing else 'examples'}" + (f"; {data.packing.summary()}" if data.packing else ""))
    lines.append(f"text in {LEARN_OPEN}...{LEARN_CLOSE} carries labels (the loss is computed on it); the rest is "
                 "context only" + (f"; {EXAMPLE_BREAK.strip()} separates the examples of a packed row"
                                   if data.packing else ""))
    return "\n".join(lines)
