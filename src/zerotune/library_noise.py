"""Silence known, harmless library messages, each by its logger and its text, never by a blanket filter.

Installed when the zerotune package is imported (in the CLI and in every worker), before any library that
emits them is imported.
"""

from __future__ import annotations

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does, in every LoRA run) looks up an optional CPU 4-bit
# inference kernel on the hub through the `kernels` package. Offline, or without the publisher's trust, the lookup
# fails and bitsandbytes warns at import; it then uses its own kernel, and zerotune's 4-bit path does not use
# that one anyway. Offline, `kernels` first warns that it skips the trust check of that same repository.
BITSANDBYTES_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": (f"Skipping publisher trust check for '{BITSANDBYTES_KERNEL_REPO}'",),
}


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def install() -> None:
    for name, prefixes in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
