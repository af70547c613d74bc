#!/bin/bash
# Offline wheels of the peers `zerotune bench --baseline trl,liger,unsloth` measures, for a GPU machine that
# cannot reach a package index and already has torch 2.11, transformers 5.17, peft 0.21, accelerate, triton
# (Python 3.12, x86-64, CUDA).
#
#   bash benchmarks/peer_wheels.sh [DIR]        (default .peer-wheels)
#
# writes two folders, each under 64 MiB so that each fits one upload to such a machine:
#   DIR/core    unsloth, unsloth_zoo, trl, liger-kernel and what they import that the machine lacks (about 41 MB)
#   DIR/qlora   bitsandbytes, for the QLoRA workloads (about 43 MB)
# On the GPU machine, `. DIR/core/install.sh` (then, for QLoRA, `. DIR/qlora/install.sh`) installs a folder into
# /tmp/peer-site, offline and without dependencies, and puts it on PYTHONPATH; the second install adds to the first.
#
# The versions match each other and the machine: unsloth 2026.10.9 accepts transformers <= 5.17.0 and
# trl <= 1.15.0, and trl 1.15.0 wants datasets >= 4.7 while unsloth wants datasets < 5.
set -euo pipefail
dir=${1:-.peer-wheels}
core=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 liger-kernel==0.8.5
      datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
      tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
      torchao==0.18.0 cut_cross_entropy==25.1.1 msgspec==0.23.0 hf_transfer==0.1.9
      structlog==26.1.0 json5==0.17.3 nest_asyncio==1.6.0)
qlora=(bitsandbytes==0.50.2)

download() {  # folder, then requirements: Python 3.12 wheels for x86-64 Linux, no dependencies resolved
  local target=$1; shift
  mkdir -p "$target"
  rm -f "$target"/*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$target" "$@"
  cat > "$target/install.sh" <<'EOS'
# Source it on the GPU machine: installs this folder's wheels into /tmp/peer-site, offline, and puts that first
# on PYTHONPATH (the hub is out of reach there, so Hugging Face libraries are told to stay offline).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peer-site \
  "$here"/*.whl || { echo "peer wheels: install failed" >&2; return 1; }
export PYTHONPATH=/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
EOS
  du -sh "$target"
}

download "$dir/core" "${core[@]}"
download "$dir/qlora" "${qlora[@]}"
