"""zerotune: fine-tune large language models with LoRA, QLoRA or full training, from one CPU to a GPU cluster."""

__version__ = "0.1.0"

from zerotune import library_noise as _library_noise

_library_noise.install()
