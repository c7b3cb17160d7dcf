#!/usr/bin/env bash
# The Python packages a lent GPU's image lacks, as wheels in .whl/ (ignored by git), for the
# device call of benchmarks/gpu_session.sh (carry [".whl", ".gpu"]). The image holds torch,
# typer, rich, pyyaml, scipy, statsmodels, safetensors and pytest (its list: the device
# tool's KINDS.md) but not pydantic, submitit or pyautoattack. Versions: this repository's
# CI environment; Python 3.12 and manylinux x86-64: the image's.
#
#   bash benchmarks/gpu_wheels.sh      # here, where pip reaches the package index
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
          typing-inspection==0.4.2 typing-extensions==4.15.0 submitit==1.5.4
          cloudpickle==3.1.3 pyautoattack==0.2.0)
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
# pyautoattack's wheel carries a 45 MB example model (examples/model_test.pt): dropped, so
# that the wheels stay far inside the device call's 64 MiB.
python3 - <<'PY'
import pathlib
import zipfile

for wheel in pathlib.Path(".whl").glob("pyautoattack-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if "/examples/" in item.filename:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(True)
                                if b"/examples/" not in line)
            dst.writestr(item, data)
    slim.replace(wheel)
PY
ls .whl
du -sh .whl
