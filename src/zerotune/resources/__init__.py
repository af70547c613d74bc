"""Files shipped with zerotune: the bundled EN+ES instruction data and the quickstart config."""

from importlib import resources
from pathlib import Path

SAMPLE_DATA = "quickstart_train.jsonl"


def resource_path(name: str) -> Path:
    return Path(str(resources.files("zerotune.resources") / name))
