"""Run training in-process the way the CLI does."""

from pathlib import Path

from safetensors.torch import load_file

from zerotune.launchers import launch
from zerotune.train import prepare_output_dir


def train(config):
    prepare_output_dir(Path(config.output.dir), overwrite=False, resume=config.checkpoint.resume)
    return launch(config, show_progress=False)


def adapter_weights(output_dir) -> dict:
    return load_file(str(Path(output_dir) / "adapter" / "adapter_model.safetensors"))
