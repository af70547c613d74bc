"""Prints the config reference table for the README, straight from the typed schema.

Usage: python scripts/config_reference.py
"""

import dataclasses

from zerotune.config import SECTIONS, field_specs


def main() -> None:
    current = None
    for key, spec, _ in field_specs():
        section = key.split(".")[0]
        if section != current:
            current = section
            print(f"\n**{section}**: {SECTIONS[section].__doc__.strip()}\n")
            print("| YAML key | flag | default | meaning |")
            print("|---|---|---|---|")
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        flag = spec.metadata["flag"] or ""
        print(f"| `{key}` | `{flag}` | `{default!r}` | {spec.metadata['help']} |")


if __name__ == "__main__":
    main()
