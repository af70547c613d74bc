"""Preference pairs: a prompt with a chosen and a rejected response, for DPO, ORPO and SimPO.

Two record forms, rendered with the same templates as SFT records:
  {"prompt": "...", "chosen": "...", "rejected": "..."}  (optional "input", "lang": "es"), alpaca or alpaca_es;
  {"messages": [...], "chosen": ..., "rejected": ...}    the chat template; "prompt" may hold the messages
  instead, and each response is a string, an assistant message or a list of messages;
  {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}  pre-tokenized (template tokens), taken as
  they are: no BOS or EOS is added (the names TRL's DPOTrainer gives tokenized pairs).
Only response tokens are scored. EOS ends each response, as in SFT. A pair longer than data.max_seq_len keeps
its prompt's end (and its BOS), so the responses survive; the responses are cut only where the longest of them
alone is longer than half the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zerotune.data.encode import IGNORE_INDEX, EncodeReport
from zerotune.data.templates import get_alpaca_template
from zerotune.errors import DataError

SIDES = ("chosen", "rejected")
TOKEN_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference: tuple[float, float] | None = None  # precomputed reference log-probs of (chosen, rejected)

    @property
    def longest(self) -> int:
        """Tokens in the longer of the two sequences (prompt + response)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def num_input_tokens(self) -> int:
        """Tokens of both sequences, as the forward sees them."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_label_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


def is_pair(record: Any) -> bool:
    return isinstance(record, dict) and any(side in record or f"{side}_ids" in record for side in SIDES)


def pair_template(record: dict, configured: str) -> str:
    """The template a pair renders with; auto: tokens for token ids, chat for messages, alpaca_es for
    "lang": "es", else alpaca."""
    if configured != "auto":
        return configured
    if "prompt_ids" in record or "chosen_ids" in record:
        return "tokens"
    if "messages" in record or isinstance(record.get("prompt"), list):
        return "chat"
    return "alpaca_es" if record.get("lang") == "es" else "alpaca"


def check_pairs(records: list[dict[str, Any]], where: list[str], template: str, source: str) -> None:
    """Every record a well-formed pair: a prompt, two non-empty responses that differ. One line per problem."""
    if not records:
        raise DataError(f"{source}: the dataset is empty; it needs at least one preference pair")
    for record, place in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(f"{place}: expected a JSON object, got {type(record).__name__}")
        name = pair_template(record, template)
        if name == "tokens":
            _check_token_pair(record, place)
            continue
        for side in SIDES:
            if side not in record or record[side] is None:
                raise DataError(f'{place}: missing field "{side}" (preference records need prompt (or messages), '
                                "chosen and rejected)")
        prompt = _prompt_messages(record, place) if name == "chat" else record.get("prompt")
        if name != "chat" and (not isinstance(prompt, str) or not prompt.strip()):
            raise DataError(f'{place}: missing field "prompt" (a non-empty string; or chat messages in "messages")')
        texts = [_response_text(record[side], side, place) for side in SIDES]
        for side, text in zip(SIDES, texts):
            if not text.strip():
                raise DataError(f'{place}: "{side}" is empty; a pair needs two non-empty responses')
        if texts[0] == texts[1]:
            raise DataError(f'{place}: "chosen" and "rejected" are identical, so the pair prefers nothing; fix or '
                            "delete the record")


def _check_token_pair(record: dict, place: str) -> None:
    for field in TOKEN_FIELDS:
        ids = record.get(field)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise DataError(f'{place}: field "{field}" must be a non-empty list of token ids (integers >= 0); '
                            "pre-tokenized pairs need prompt_ids, chosen_ids and rejected_ids")
    if record["chosen_ids"] == record["rejected_ids"]:
        raise DataError(f'{place}: "chosen_ids" and "rejected_ids" are identical, so the pair prefers nothing; fix or '
                        "delete the record")


def _prompt_messages(record: dict, place: str) -> list[dict]:
    messages = record.get("messages", record.get("prompt"))
    if isinstance(messages, str):  # a plain prompt under --template chat: one user turn
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{place}: missing field "messages" (the prompt as a list of role/content messages)')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
            raise DataError(f"{place}: messages[{index}] needs role and content (a string)")
    return messages


def _response_messages(value: Any, side: str, place: str) -> list[dict]:
    """A response as assistant messages: a string, one message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = [value] if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f'{place}: field "{side}" must be a string, an assistant message or a list of messages')
    return messages


def _response_text(value: Any, side: str, place: str) -> str:
    return "\n".join(m["content"] for m in _response_messages(value, side, place))


def encode_pair(tokenizer, record: dict, template_name: str, place: str) -> EncodedPair:
    if template_name == "tokens":
        return EncodedPair(*(list(record[field]) for field in TOKEN_FIELDS))
    if template_name == "chat":
        return _encode_chat_pair(tokenizer, record, place)
    template = get_alpaca_template(template_name)
    prompt = template.render_prompt(record["prompt"], record.get("input") or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    responses = [tokenizer(record[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                 for side in SIDES]
    return EncodedPair(prompt_ids, *responses)


def _encode_chat_pair(tokenizer, record: dict, place: str) -> EncodedPair:
    """The prompt rendered with the generation prompt; each response is what the chat template adds after it
    (tokenized on its own, as SFT's encode_chat labels each assistant turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use --template alpaca or a chat model's tokenizer")
    prompt = _prompt_messages(record, place)
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for side in SIDES:
        full = tokenizer.apply_chat_template(prompt + _response_messages(record[side], side, place), tokenize=False)
        if not full.startswith(before):
            raise DataError(f"{place}: the chat template renders the prompt differently once the {side} response "
                            "follows, so the response tokens cannot be told apart; use --template alpaca")
        ids = tokenizer(full[len(before):], add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        responses.append(ids)
    return EncodedPair(tokenizer(before, add_special_tokens=False)["input_ids"], *responses)


def fit_pair(pair: EncodedPair, max_seq_len: int, bos_token_id: int | None) -> EncodedPair:
    """Cut a pair to ``max_seq_len`` tokens per sequence: the prompt keeps its end (and a leading BOS), at least
    half the window or all of itself; the responses keep their start in what is left."""
    longest_response = max(len(pair.chosen_ids), len(pair.rejected_ids))
    prompt_room = max(max_seq_len - longest_response, min(len(pair.prompt_ids), max_seq_len // 2), 1)
    prompt = pair.prompt_ids
    if len(prompt) > prompt_room:
        keep_bos = bos_token_id is not None and prompt[0] == bos_token_id and prompt_room > 1
        prompt = prompt[:1] + prompt[len(prompt) - prompt_room + 1:] if keep_bos else prompt[-prompt_room:]
    room = max_seq_len - len(prompt)
    return EncodedPair(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room])


def encode_pairs(tokenizer, records, where, template: str | list[str], max_seq_len: int, overlong: str,
                 keep_dropped: bool = False):
    """Encode preference records with one configured template or one per record (a mixture's); as
    encode.encode_records (dropped pairs stay as None with keep_dropped)."""
    from zerotune.data.encode import all_dropped_error

    report = EncodeReport(total=len(records), unit="pairs")
    pairs: list[EncodedPair | None] = []
    templates = [template] * len(records) if isinstance(template, str) else template
    for record, place, configured in zip(records, where, templates):
        name = pair_template(record, configured)
        report.templates[name] = report.templates.get(name, 0) + 1
        pair = encode_pair(tokenizer, record, name, place)
        if pair.longest > max_seq_len:
            if overlong == "drop":
                report.dropped += 1
                report.fewest_to_keep = min(filter(None, (report.fewest_to_keep, pair.longest)))
                if keep_dropped:
                    pairs.append(None)
                continue
            pair = fit_pair(pair, max_seq_len, tokenizer.bos_token_id)
            report.truncated += 1
        pairs.append(pair)
    report.kept = sum(pair is not None for pair in pairs)
    if keep_dropped:
        return pairs, report
    if not pairs:
        raise all_dropped_error(report, max_seq_len, overlong)
    return pairs, report


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int, row_length: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """One batch for one forward: the B chosen sequences, then the B rejected ones (2B rows, right-padded).
    Labels hold the response tokens only; the attention mask is kept even without padding (ORPO's NLL term
    reads it). ``row_length`` (--packing): the forward runs on those sequences packed into rows of up to
    that many tokens (pack_sequences); the 2B rows stay in the batch, as the layout scores are read in."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    longest = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response)
        labels[row, len(prompt):length] = torch.tensor(response)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if pairs[0].reference is not None:  # precomputed (zerotune.objectives.step.attach_reference): chosen, rejected
        batch["reference_logps"] = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs])
    if row_length is not None:
        batch.update(pack_sequences(input_ids, attention_mask, row_length, pad_token_id))
    return batch


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, row_length: int, pad_token_id: int
                   ) -> dict[str, torch.Tensor]:
    """The right-padded sequences of a pair batch (every prompt + chosen, then every prompt + rejected) packed
    first-fit-decreasing into rows of up to ``row_length`` tokens (ties broken by position, so deterministic),
    each a segment with its own position ids 0, 1, ...: called with those and no attention mask, transformers
    makes attention block-diagonal (flash-attention 2 runs varlen), so no token sees another sequence.
      packed_input_ids, packed_position_ids  [packed rows, longest row]: the forward's inputs (padding at the
        end of a row counts 0, 1, ... as a sequence of its own, as in zerotune.data.batches.collate);
      packed_index  [2B, longest sequence]: where token j of sequence s sits in the packed rows, flattened;
        padding points one past the end (rows x longest row), a slot that reads as 0 (objectives.logps)."""
    from zerotune.data.packing import first_fit_rows

    lengths = attention_mask.sum(-1).tolist()
    row_of, rows = first_fit_rows(lengths, row_length)
    members: list[list[int]] = [[] for _ in range(rows)]
    for sequence, row in enumerate(row_of.tolist()):
        members[row].append(sequence)
    width = max(sum(lengths[s] for s in row) for row in members)
    packed_ids = torch.full((len(members), width), pad_token_id, dtype=torch.long)
    positions = torch.arange(width).repeat(len(members), 1)
    index = torch.full(input_ids.shape, len(members) * width, dtype=torch.long)
    for row, sequences in enumerate(members):
        start = 0
        for sequence in sorted(sequences):
            length = lengths[sequence]
            packed_ids[row, start:start + length] = input_ids[sequence, :length]
            positions[row, start:start + length] = torch.arange(length)
            index[sequence, :length] = torch.arange(row * width + start, row * width + start + length)
            start += length
        positions[row, start:] = torch.arange(width - start)
    return {"packed_input_ids": packed_ids, "packed_position_ids": positions, "packed_index": index}
