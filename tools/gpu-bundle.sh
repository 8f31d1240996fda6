#!/usr/bin/env bash
# DALI for a GPU machine that has no package registry and takes at most 64 MiB per run: the wheels the project's
# GPU path needs and that machine lacks, split into parts that consecutive runs bring into one folder there.
#
# On a developer machine (reaches PyPI):
#   tools/gpu-bundle.sh download [BUNDLE]      pip download the wheels below (Python 3.12, manylinux x86_64), then split
#   tools/gpu-bundle.sh split SRC [BUNDLE]     SRC's files → BUNDLE/part-NNN (≤ PART_SIZE bytes each) + BUNDLE/SHA256SUMS
# On the GPU machine (one run per part, back to back: its /tmp lasts only while it stays warm):
#   tools/gpu-bundle.sh collect [BUNDLE] [STORE]    copy the parts this run carried into STORE; say what is missing
#   tools/gpu-bundle.sh assemble [STORE] DEST       check every part's sha256, join them, unpack the files into DEST
#   tools/gpu-bundle.sh install [STORE] [TARGET]    assemble, pip install --no-deps --target TARGET, then prove
#                                                   `import nvidia.dali` and one `mixed` decode on the GPU
# BUNDLE: gpu-bundle/ in the repository (git-ignored); STORE: /tmp/gpu-bundle; TARGET: STORE/site (bench/gpu.sh
# puts it on PYTHONPATH when present). A missing or corrupt part is one line naming it, exit 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python3 || command -v python)}
PART_SIZE=${PART_SIZE:-$((56 * 1024 * 1024))}  # 56 MiB: a part, the sums and the source tree fit one 64 MiB run
STORE_DEFAULT=/tmp/gpu-bundle

# DALI's Requires-Dist (nvidia-dali-cuda130 2.4.0) as far as the GPU machine lacks it and the project's GPU path
# imports it; the versions are the ones this project's venv runs. Not bundled: numpy, packaging, six and
# typing-extensions (on that image: torch and matplotlib bring them) and nvtx, makefun, libcst (DALI requires
# them, but neither `import nvidia.dali` nor the project's pipelines import them).
WHEELS=(
    nvidia-dali-cuda130==2.4.0
    nvidia-nvimgcodec-cu13==0.9.0.20  # DALI: nvidia-nvimgcodec-cu13[all]>=0.9.0,<0.10.0 (the GPU decoders)
    nvidia-nvjpeg==13.3.2.43          # nvimgcodec[all]: nvJPEG (torch's CUDA wheels do not bring it)
    nvidia-nvjpeg2k-cu13==0.11.0.51   # nvimgcodec[all]: nvJPEG2000
    nvidia-nvtiff-cu13==0.8.0.82      # nvimgcodec[all]: nvTIFF >= 0.8.0
    nvidia-libnvcomp-cu13==5.3.0.16   # DALI: ==5.3.0.16 (nvimgcodec[all]: >=5,<6)
    optree==0.20.0                    # import nvidia.dali
    gast==0.7.0                       # import nvidia.dali: >=0.3.3,<=0.7.0
    astunparse==1.6.3                 # import nvidia.dali: >=1.6.0,<=1.6.3
)

die() { echo "gpu-bundle: $*" >&2; exit 2; }

listed_parts() {  # the part names in SUMS, in order
    awk '{print $2}' "$1"
}

split_files() {  # split SRC BUNDLE
    local src=$1 bundle=$2
    [ -d "$src" ] || die "expected a folder of files to bundle, found no folder at $src"
    [ -n "$(ls -A "$src")" ] || die "expected files to bundle in $src, found none"
    mkdir -p "$bundle"
    rm -f "$bundle"/part-* "$bundle/SHA256SUMS"
    tar -C "$src" -cf - . | split -b "$PART_SIZE" -d -a 3 - "$bundle/part-"
    (cd "$bundle" && sha256sum part-* >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
    echo "gpu-bundle: $(du -sb "$src" | cut -f1) bytes in $(wc -l <"$bundle/SHA256SUMS") parts of at most" \
         "$PART_SIZE bytes under $bundle (sums: $bundle/SHA256SUMS)"
    ls -l "$bundle"
}

collect() {  # collect BUNDLE STORE: what this run carried → STORE
    local bundle=$1 store=$2
    [ -f "$bundle/SHA256SUMS" ] || die "expected $bundle/SHA256SUMS (carry it with every part), found none"
    mkdir -p "$store"
    cp "$bundle/SHA256SUMS" "$store/SHA256SUMS"
    local part have=() missing=()
    for part in "$bundle"/part-*; do
        [ -f "$part" ] && cp "$part" "$store/$(basename "$part").tmp" && mv "$store/$(basename "$part").tmp" \
            "$store/$(basename "$part")"
    done
    for part in $(listed_parts "$store/SHA256SUMS"); do
        if [ -f "$store/$part" ]; then have+=("$part"); else missing+=("$part"); fi
    done
    echo "gpu-bundle: $store holds ${#have[@]} of $((${#have[@]} + ${#missing[@]})) parts" \
         "(${have[*]:-none}); still to bring: ${missing[*]:-none}"
}

assemble() {  # assemble STORE DEST
    local store=$1 dest=$2 part expected found
    [ -f "$store/SHA256SUMS" ] || die "expected $store/SHA256SUMS (run collect first), found none"
    for part in $(listed_parts "$store/SHA256SUMS"); do
        [ -f "$store/$part" ] || die "$part is missing from $store (SHA256SUMS lists $(wc -l <"$store/SHA256SUMS")" \
                                     "parts): carry it with tools/gpu-bundle.sh collect"
        expected=$(awk -v p="$part" '$2 == p {print $1}' "$store/SHA256SUMS")
        found=$(sha256sum "$store/$part" | cut -d' ' -f1)
        [ "$found" = "$expected" ] || die "$store/$part is corrupt: sha256 $found, expected $expected; carry it again"
    done
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    (cd "$store" && cat $(listed_parts SHA256SUMS)) | tar -C "$dest.tmp" -xf - \
        || die "the parts in $store passed their sums but do not form a tar (made by another split?)"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo "gpu-bundle: $(ls "$dest" | wc -l) files reassembled into $dest"
}

install() {  # install STORE TARGET
    local store=$1 target=$2
    assemble "$store" "$store/wheels"
    "$PY" -m pip --version >/dev/null 2>&1 || die "expected pip for $PY to install the wheels, found none"
    rm -rf "$target.tmp"
    "$PY" -m pip install --quiet --no-deps --no-index --target "$target.tmp" "$store"/wheels/*.whl \
        || die "pip install --no-deps --target $target.tmp failed for the wheels in $store/wheels"
    rm -rf "$target" && mv "$target.tmp" "$target"
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$target" <<'PY'
"""Prove DALI works here: imported from the target, and one `mixed` decode whose output is on the GPU."""
import io
import sys

import numpy as np
import torch  # noqa: F401 - first, as in the project: its CUDA libraries loaded before DALI's
import nvidia.dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from PIL import Image

assert nvidia.dali.__file__.startswith(sys.argv[1]), f"nvidia.dali imported from {nvidia.dali.__file__}"
ramp = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
buffer = io.BytesIO()
Image.fromarray(ramp).save(buffer, "JPEG", quality=95)
jpeg = np.frombuffer(buffer.getvalue(), np.uint8)


@pipeline_def(batch_size=2, num_threads=2, device_id=0)
def decode(device):
    return fn.decoders.image(fn.external_source(source=lambda: [jpeg, jpeg]), device=device, output_type=types.RGB)


outputs = {}
for device in ("mixed", "cpu"):
    pipe = decode(device)
    pipe.build()
    (outputs[device],) = pipe.run()
gpu, cpu = outputs["mixed"], outputs["cpu"]
assert type(gpu).__name__ == "TensorListGPU", f"mixed decode gave {type(gpu).__name__}, not a GPU tensor list"
diff = np.abs(np.asarray(gpu.as_cpu()[0]).astype(int) - np.asarray(cpu[0]).astype(int)).max()
print(f"gpu-bundle: nvidia.dali {nvidia.dali.__version__} from {nvidia.dali.__file__}; mixed decode → "
      f"{type(gpu).__name__} {gpu[0].shape()} on GPU 0, largest difference from the CPU decode {diff}")
PY
}

command=${1:-}
shift || true
case "$command" in
    download)
        bundle=${1:-gpu-bundle}
        wheels=$(mktemp -d /tmp/gpu-bundle-wheels.XXXXXX)
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$wheels" "${WHEELS[@]}"
        ls -l "$wheels"
        split_files "$wheels" "$bundle"
        rm -rf "$wheels"
        ;;
    split) split_files "${1:?usage: split SRC [BUNDLE]}" "${2:-gpu-bundle}" ;;
    collect) collect "${1:-gpu-bundle}" "${2:-$STORE_DEFAULT}" ;;
    assemble) assemble "${1:-$STORE_DEFAULT}" "${2:?usage: assemble STORE DEST}" ;;
    install) install "${1:-$STORE_DEFAULT}" "${2:-${1:-$STORE_DEFAULT}/site}" ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$command" ] || die "unknown command $command" ;;
esac
