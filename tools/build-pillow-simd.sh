#!/usr/bin/env bash
# Build pillow-simd from its sdist as a wheel named `pillow` (version 12.1.1.post0+simd).
# Why: torchvision requires the distribution `pillow`; installed under its own name `pillow-simd`, any later
# (re)install of torchvision silently puts stock Pillow's PIL over it. Under the name `pillow` with an exact pin
# in pyproject.toml, pip sees the requirement satisfied and keeps the SIMD build.
# Usage: tools/build-pillow-simd.sh PYTHON OUT_DIR
set -euo pipefail
python=$1
out=$(realpath -m "$2")
version=12.1.1.post0
if ls "$out"/pillow-${version}+simd-*.whl >/dev/null 2>&1; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: "pillow-simd==${version}" -d "$work"
tar -xzf "$work/pillow_simd-${version}.tar.gz" -C "$work"
src="$work/pillow_simd-${version}"
sed -i 's/^name = "pillow-simd"/name = "pillow"/' "$src/pyproject.toml"
sed -i "s/^__version__ = \"${version}\"/__version__ = \"${version}+simd\"/" "$src/src/PIL/_version.py"
mkdir -p "$out"
CC="${CC:-cc -mavx2}" "$python" -m pip wheel --quiet --no-deps "$src" -w "$out"
ls "$out"/pillow-${version}+simd-*.whl
