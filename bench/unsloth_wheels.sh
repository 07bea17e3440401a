#!/usr/bin/env bash
# Unsloth's own environment for `bench/bench.py --only ours unsloth`, as wheels for a machine without a registry
# (Python 3.12, x86_64): unsloth 2026.10.9 without its studio/ web app (2.3 MB instead of 28 MB) and what it needs
# beyond a torch 2.11 / transformers 5.17 / accelerate image; bitsandbytes slimmed to its CUDA 13 and CPU libraries.
# About 19 MB.
#
#   bench/unsloth_wheels.sh DIR
#   python3 -m pip install -q --no-index --no-deps --target SITE DIR/*.whl      # on the GPU machine
#   python bench/bench.py --only ours unsloth ours_8k unsloth_8k --unsloth-pythonpath SITE
#
# With a registry at hand, a venv with `pip install unsloth==2026.10.9` and `--unsloth-python VENV/bin/python` does
# the same.
set -euo pipefail
dir=${1:?usage: unsloth_wheels.sh DIR}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$dir" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 \
  cut_cross_entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 msgspec==0.23.0 hf_transfer==0.1.9 \
  dill==0.4.0 multiprocess==0.70.18 peft==0.21.2 bitsandbytes==0.50.2
python3 - "$dir" <<'EOF'
import sys, zipfile
from pathlib import Path

for wheel, drop in (("unsloth-2026.10.9-*.whl", lambda n: n.startswith("studio/")),
                    ("bitsandbytes-*.whl", lambda n: "libbitsandbytes_" in n and "cuda130" not in n and "cpu" not in n)):
    for path in Path(sys.argv[1]).glob(wheel):
        slim = path.with_suffix(".slim")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if not drop(item.filename):
                    dst.writestr(item, src.read(item.filename))
        slim.replace(path)
EOF
du -sh "$dir"
