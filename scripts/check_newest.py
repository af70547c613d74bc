"""Try zerotune against the newest releases of everything it depends on, and say what breaks.

Run it at the start of a working session, before new work: upstream changes then reach us before they reach a
user. It is not part of CI (CI installs the tested lock, constraints.txt, so that it passes on any day).

    python3 scripts/check_newest.py              # newest releases, fast test tier (pytest -m "not slow")
    python3 scripts/check_newest.py --full       # the whole suite
    python3 scripts/check_newest.py --write-lock # after a green run: constraints.txt from what was tested

It builds a fresh virtual environment in a temporary directory, installs zerotune without its version caps and
then the newest release of every dependency, prints each package's locked and newest versions side by side, runs
the tests, and exits with pytest's status. How to move the lock forward: docs/development.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
# Every distribution zerotune or its extras name (pyproject.toml), installed at its newest release.
DEPENDENCIES = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pyyaml", "tqdm",
                "matplotlib", "pyarrow", "mlflow", "datasets", "deepspeed", "ray[train]", "bitsandbytes", "pytest",
                "mkdocs", "mkdocs-material"]
# Left out of the lock: torch comes first, from the machine's own index (CPU or CUDA build), and brings these.
NOT_LOCKED = ("torch", "triton", "nvidia-", "cuda-", "zerotune")


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, **kwargs)


def versions(python: str) -> dict[str, str]:
    frozen = run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True)
    pins = [line.split("==") for line in frozen.stdout.splitlines() if "==" in line and not line.startswith("#")]
    return {name.lower(): version for name, version in pins}


def locked() -> dict[str, str]:
    pins = [line.split("==") for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")]
    return {name.lower(): version for name, version in pins}


def lock_text(pins: dict[str, str]) -> str:
    kept = {name: version for name, version in sorted(pins.items()) if not name.startswith(NOT_LOCKED)}
    header = ("# The tested dependency set: the README's commands and CI install zerotune with -c constraints.txt.\n"
              "# Written by scripts/check_newest.py --write-lock after a green run; see docs/development.md.\n"
              "# torch is not pinned here: the first set-up command installs it (CPU or CUDA build).\n")
    return header + "".join(f"{name}=={version}\n" for name, version in kept.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="run the whole test suite, not only the fast tier")
    parser.add_argument("--write-lock", action="store_true", help="after a green run, rewrite constraints.txt")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environment and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zerotune-newest-"))
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    run([python, "-m", "pip", "install", "-q", "--upgrade", *DEPENDENCIES], check=True)
    newest, pinned = versions(python), locked()
    changed = {name: (pinned.get(name, "-"), version) for name, version in newest.items()
               if pinned.get(name) != version and not name.startswith(NOT_LOCKED)}
    print(f"\n{len(changed)} packages differ from constraints.txt (locked -> newest):")
    for name, (old, new) in sorted(changed.items()):
        print(f"  {name:32} {old:>14} -> {new}")
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + ([] if args.full else ["-m", "not slow"])
    status = run(tests, cwd=ROOT).returncode
    print(f"\nnewest releases: tests {'passed' if status == 0 else f'FAILED (pytest exit {status})'}")
    if status == 0 and args.write_lock:
        LOCK.write_text(lock_text(newest))
        print(f"wrote {LOCK.relative_to(ROOT)}; raise pyproject.toml's caps to match, then run the README's commands")
    if args.keep:
        print(f"virtual environment kept: {venv}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
