#!/usr/bin/env bash
# Builds mergesmith with `--features cuda` on any Linux x86-64 machine, GPU or not: nvcc, its
# compiler back end (cicc), the CUDA headers and CCCL come as NVIDIA's pip wheels into a
# virtual environment under target/, so no CUDA toolkit has to be installed.
#
# Usage: tools/build-cuda.sh [CAP] [cargo build args...]
#   CAP: the GPU's compute capability without the dot (default 90: H100/H200; 80: A100,
#        89: L4/RTX 40xx, 86: RTX 30xx). The kernels are compiled to PTX for it.
#   cargo build args: default `--release`; CI passes `--locked --profile dev --all-targets`.
# Output: target/cuda/release/mergesmith ($CARGO_TARGET_DIR, default target/cuda, keeps the
# CUDA build apart from the CPU one, which has other features).
#
# The toolkit is CUDA 13.0 (pinned: cudarc 0.19 knows CUDA up to 13.4, and an older PTX
# version loads on more drivers; CUDA 13 needs an NVIDIA driver of release 580 or newer).
# The CUDA 12 nvcc wheels carry ptxas but not the nvcc driver, so they cannot build this.
# Linking the executable needs the CUDA libraries (below); running it, a GPU and its driver.
set -euo pipefail
cd "$(dirname "$0")/.."
cap=${1:-90}
shift || true
venv=target/cuda-toolkit
# With CUDA_OPTIONAL=1 (CI), a machine that cannot fetch the wheels skips the build, saying so.
unavailable() {
    echo "cannot install the CUDA toolkit wheels: $1" >&2
    if [ -n "${CUDA_OPTIONAL:-}" ]; then
        echo "skipping the CUDA build" >&2
        exit 0
    fi
    exit 1
}
if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv" || unavailable "python3 -m venv failed"
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" || unavailable "pip install failed"
toolkit=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
"$toolkit/bin/nvcc" --version | tail -1
export PATH="$toolkit/bin:$PATH" CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit" CUDA_COMPUTE_CAP="$cap"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
[ $# -gt 0 ] || set -- --release
# candle 0.11 links cudarc against libcuda (the driver's), libcudart, libnvrtc, libcublas,
# libcublasLt and libcurand. Where they are missing (a machine without a GPU driver), the
# library is compiled, CUDA kernels included, and the executable is not linked.
if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\b' && ldconfig -p | grep -q 'libcublas\.so\b'; then
    cargo build --features cuda "$@"
    echo "built with --features cuda in $CARGO_TARGET_DIR for compute capability $cap"
else
    echo "no libcuda / libcublas here: compiling the library only (the link needs them)" >&2
    cargo build --features cuda --lib "$@"
    echo "compiled the library with --features cuda (compute capability $cap); not linked"
fi
