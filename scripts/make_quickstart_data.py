"""Writes the bundled English+Spanish counting dataset used by the offline quickstart.

Usage: python scripts/make_quickstart_data.py   (rewrites src/zerotune/resources/quickstart_*.jsonl)

The base model is first pre-trained (full fine-tuning) on English counting up only; LoRA then teaches it
counting down, the Spanish answers and the input form. The task (count up or down between two numbers; Spanish answers join the last number with "y") is one a
small model visibly learns in a minute on a CPU, and held-out number pairs show it generalises.
"""

import json
import random
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "src" / "zerotune" / "resources"


def spanish_list(numbers):
    return ", ".join(map(str, numbers[:-1])) + f" y {numbers[-1]}"


def records_for(start, end):
    up = list(range(start, end + 1))
    down = up[::-1]
    return [
        {"instruction": f"Count from {start} to {end}.", "input": "", "output": ", ".join(map(str, up)), "lang": "en"},
        {"instruction": f"Count down from {end} to {start}.", "input": "", "output": ", ".join(map(str, down)),
         "lang": "en"},
        {"instruction": "Count between these two numbers.", "input": f"{start} and {end}",
         "output": ", ".join(map(str, up)), "lang": "en"},
        {"instruction": f"Cuenta del {start} al {end}.", "input": "", "output": spanish_list(up), "lang": "es"},
        {"instruction": f"Cuenta hacia atrás del {end} al {start}.", "input": "", "output": spanish_list(down),
         "lang": "es"},
    ]


def main():
    rng = random.Random(7)
    pairs = [(start, start + span) for start in range(1, 19) for span in range(2, 7) if start + span <= 20]
    rng.shuffle(pairs)
    held_out = pairs[:8]
    train = [record for pair in pairs[8:] for record in records_for(*pair)]
    evaluation = [record for pair in held_out for record in records_for(*pair)]
    rng.shuffle(train)
    # What the base model is pre-trained on before LoRA: English counting up only, no held-out pairs.
    base = [records_for(*pair)[0] for pair in pairs[8:]]
    RESOURCES.mkdir(parents=True, exist_ok=True)
    for name, rows in (("quickstart_train.jsonl", train), ("quickstart_eval.jsonl", evaluation),
                       ("quickstart_base.jsonl", base)):
        with (RESOURCES / name).open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(train)} train and {len(evaluation)} held-out records in {RESOURCES}")


if __name__ == "__main__":
    main()
