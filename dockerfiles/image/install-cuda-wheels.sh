#!/bin/sh
# Unpacks NVIDIA's CUDA wheels (the named context cuda-toolkit, pinned by pipeline/build/cuda-wheels.yaml)
# into PREFIX, laid out as nvcc's own nvcc.profile expects (bin/, include/, lib/, nvvm/). Adds
# the unversioned library names CMake's FindCUDAToolkit links against, and a link-time stub of
# the driver library (lib/stubs/libcuda.so, soname libcuda.so.1: ggml links the driver API;
# the host's driver provides the real one, so the stub never reaches an image). ORIGINS gets
# "<file><TAB><wheel name><TAB><version><TAB><licence>" per file, for the SBOM inventory.
#
#   install-cuda-wheels.sh WHEEL_DIR PREFIX ORIGINS
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 WHEEL_DIR PREFIX ORIGINS" >&2
    exit 2
fi
wheels=$1 prefix=$2 origins=$3
unpacked=$(mktemp -d)
mkdir -p "$prefix"
: >"$origins"
found=0
for wheel in "$wheels"/*.whl; do
    [ -e "$wheel" ] || break
    found=$((found + 1))
    rm -rf "${unpacked:?}"/*
    unzip -q "$wheel" -d "$unpacked"
    metadata=$(find "$unpacked" -path '*.dist-info/METADATA' | head -n 1)
    name=$(sed -n 's/^Name: //p' "$metadata" | head -n 1)
    version=$(sed -n 's/^Version: //p' "$metadata" | head -n 1)
    licence=$(sed -n 's/^License-Expression: //p' "$metadata" | head -n 1)
    # Every wheel puts its files under nvidia/<toolkit>/ (nvidia/cu13/ for CUDA 13).
    root=$(find "$unpacked/nvidia" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    (cd "$root" && find . -type f) | while IFS= read -r file; do
        printf '%s\t%s\t%s\t%s\n' "$prefix/${file#./}" "$name" "$version" \
            "${licence:-LicenseRef-NVIDIA-Proprietary}" >>"$origins"
    done
    cp -a "$root"/. "$prefix"/
done
if [ "$found" -eq 0 ]; then
    echo "error: no wheels in $wheels (the build context cuda-toolkit; nox -s build fetches it)" >&2
    exit 1
fi
rm -rf "$unpacked"

# libcublas.so -> libcublas.so.13, and lib64 for tools that look there.
for library in "$prefix"/lib/lib*.so.*; do
    base=${library%%.so.*}.so
    [ -e "$base" ] || ln -s "${library##*/}" "$base"
done
[ -e "$prefix/lib64" ] || ln -s lib "$prefix/lib64"

# The stub: every driver-API function cuda.h declares (after its macros pick the versioned
# names), defined to fail. Only the linker sees it.
mkdir -p "$prefix/lib/stubs"
gcc -E -P -I"$prefix/include" "$prefix/include/cuda.h" | tr '\n' ' ' |
    grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/^CUresult +//; s/ *\($//' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$prefix/lib/stubs/libcuda-stub.c"
gcc -shared -fPIC -o "$prefix/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 \
    "$prefix/lib/stubs/libcuda-stub.c"
rm "$prefix/lib/stubs/libcuda-stub.c"
"$prefix/bin/nvcc" --version | tail -n 1
