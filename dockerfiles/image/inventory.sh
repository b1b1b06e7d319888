#!/bin/sh
# The inventory of an assembled rootfs, for its SBOM (pipeline/build/sbom.py writes the CycloneDX
# document from it): one line per regular file, tab-separated:
#
#   path  sha256  size  origin  package  version  arch  licence
#
# origin is `deb` for a file copied from a Debian package of the build machine (package,
# version, architecture from dpkg; the licence from the package's DEP-5 copyright file),
# `llama.cpp` for what was compiled from the pinned source (/app), `project` for this
# project's own files (the entrypoint, passwd/group), `pypi` for a file unpacked from a wheel
# (NVIDIA's CUDA libraries: WHEELS lists "<file><TAB><name><TAB><version><TAB><licence>", as
# install-cuda-wheels.sh wrote it). Runs in the builder, as assemble-rootfs.sh.
#
#   inventory.sh ROOTFS ORIGINS APP_ORIGIN BUSYBOX_PATH TARGET_ARCH OUT [WHEELS]
set -eu

if [ "$#" -ne 6 ] && [ "$#" -ne 7 ]; then
    echo "usage: $0 ROOTFS ORIGINS APP_ORIGIN BUSYBOX_PATH TARGET_ARCH OUT [WHEELS]" >&2
    exit 2
fi
rootfs=$1 origins=$2 app_origin=$3 busybox=$4 target_arch=$5 out=$6 wheels=${7:-/dev/null}

# The package owning FILE (its own path, or with usrmerge's /usr prefix): "name:arch".
owner() {
    real=$(readlink -f "$1")
    for candidate in "$real" "/usr$real" "$1"; do
        found=$(dpkg-query -S "$candidate" 2>/dev/null | sed -n 's/: \/.*//p' | head -n 1)
        if [ -n "$found" ]; then
            printf '%s\n' "$found"
            return 0
        fi
    done
    return 1
}

# The first `License:` of the `Files: *` stanza of a DEP-5 copyright file.
licence() {
    copyright=/usr/share/doc/$1/copyright
    if [ -f "$copyright" ]; then
        awk '/^Files: *\*$/ { files = 1 } files && /^License:/ { sub(/^License: */, ""); print; exit }' \
            "$copyright"
    fi
}

: >"$out"
find "$rootfs" -type f | sort | while IFS= read -r file; do
    path=${file#"$rootfs"}
    sum=$(sha256sum "$file" | cut -d' ' -f1)
    size=$(wc -c <"$file" | tr -d ' ')
    source=$(awk -F '\t' -v p="$path" '$1 == p { print $2; exit }' "$origins")
    origin=project package=- version=- arch=- licence=-
    case $path in
        /app/entrypoint.sh | /app/healthcheck.sh) ;;
        /app/*) origin=$app_origin ;;
    esac
    if [ "$path" = "$busybox" ]; then
        # Unpacked from the target's busybox-static .deb, never installed: its version is in
        # the binary itself (read, not run: it is the target's code).
        origin=deb package=busybox-static
        version=$(grep -a -o -m 1 'BusyBox v[^ ]* (Debian [^)]*)' "$file" | sed 's/.*(Debian \(.*\))/\1/')
        arch=$target_arch
    elif [ "$source" = /etc/ssl/certs/ca-certificates.crt ]; then
        # Made by ca-certificates' own update hook from the certificates it ships.
        origin=deb package=ca-certificates arch=all
        version=$(dpkg-query -W -f '${Version}' ca-certificates)
        licence=$(licence ca-certificates)
        licence=${licence:--}
    elif [ -n "$source" ] && wheel=$(awk -F '\t' -v p="$(readlink -f "$source")" \
        '$1 == p { print $2 "\t" $3 "\t" $4; exit }' "$wheels") && [ -n "$wheel" ]; then
        origin=pypi arch=$target_arch
        package=$(printf '%s' "$wheel" | cut -f1)
        version=$(printf '%s' "$wheel" | cut -f2)
        licence=$(printf '%s' "$wheel" | cut -f3)
    elif [ -n "$source" ] && name=$(owner "$source"); then
        origin=deb package=${name%%:*} arch=${name#*:}
        [ "$arch" = "$name" ] && arch=all
        version=$(dpkg-query -W -f '${Version}' "$name" 2>/dev/null || echo -)
        licence=$(licence "$package")
        licence=${licence:--}
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$path" "$sum" "$size" "$origin" "$package" "$version" "$arch" "$licence" >>"$out"
done
