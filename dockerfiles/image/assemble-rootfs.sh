#!/bin/sh
# Assembles a from-scratch runtime filesystem for a target architecture on the build machine,
# without running any target code: ELF dependencies are read with the cross readelf, the
# target's shared libraries are copied from its multiarch and cross directories, and busybox
# (static, unpacked from the target's .deb) provides /bin/sh and wget for the entrypoint and
# the healthcheck. Runs in the builder stage of cpu.Dockerfile.
#
#   assemble-rootfs.sh TRIPLET APP_DIR BUSYBOX ENTRYPOINT USER UID ROOTFS ORIGINS
#
# Result under ROOTFS: /app (llama-server, its libraries, entrypoint.sh), /lib/TRIPLET (the
# closure of their NEEDED entries), the ELF interpreter at its own path, /bin/{busybox,sh,wget},
# /etc/{passwd,group,nsswitch.conf}, /etc/ssl/certs/ca-certificates.crt, /tmp, /home/USER, and
# /cache (downloads: USER's, writable by group 0 too, for a run as an arbitrary uid of group 0).
# healthcheck.sh is taken from beside ENTRYPOINT.
# ORIGINS gets a line "<path in the image><TAB><file it was copied from>" for every file taken
# from the build machine's packages: inventory.sh turns that into the image's SBOM inventory.
#
# Environment: ASSEMBLE_LIBRARY_DIRS, more directories to take libraries from (searched first:
# a CUDA toolkit's); ASSEMBLE_HOST_LIBRARIES, NEEDED names the host provides at run time (the
# NVIDIA driver's libcuda.so.1), left out; ASSEMBLE_VULKAN_DRIVERS, the Vulkan drivers to carry
# by the names of their ICD manifests (/usr/share/vulkan/icd.d/NAME_icd.json): each manifest at
# its own path, where the Vulkan loader looks, and the driver library it names in /lib/TRIPLET;
# ASSEMBLE_DLOPENED, libraries loaded with dlopen (in no NEEDED list: the HIP runtime's comgr),
# carried with their closure; ASSEMBLE_LIBRARY_DATA, a file listing data files by their path
# under /usr/lib/TRIPLET (rocBLAS's kernels), each carried at that path under /lib/TRIPLET.
set -eu

if [ "$#" -ne 8 ]; then
    echo "usage: $0 TRIPLET APP_DIR BUSYBOX ENTRYPOINT USER UID ROOTFS ORIGINS" >&2
    exit 2
fi
triplet=$1 app=$2 busybox=$3 entrypoint=$4 user=$5 uid=$6 rootfs=$7 origins=$8
: >"$origins"

readelf="$triplet-readelf"
libdir="$rootfs/lib/$triplet"
# Multiarch packages (libssl-dev:arm64 pulls libc6:arm64) first, then the cross toolchain's
# own copies (libstdc++, libgcc_s, libgomp); same Debian release, same versions.
search="${ASSEMBLE_LIBRARY_DIRS:-} /usr/lib/$triplet /lib/$triplet /usr/$triplet/lib"
host_libraries=" ${ASSEMBLE_HOST_LIBRARIES:-} "

find_lib() {
    for dir in $search; do
        if [ -e "$dir/$1" ]; then
            printf '%s\n' "$dir/$1"
            return 0
        fi
    done
    return 1
}

# copy_lib SOURCE NAME: into /lib/TRIPLET as NAME, where it came from recorded.
copy_lib() {
    cp -L "$1" "$libdir/$2"
    printf '%s\t%s\n' "/lib/$triplet/$2" "$1" >>"$origins"
}

needed() {
    "$readelf" -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'
}

mkdir -p "$rootfs/app" "$rootfs/bin" "$rootfs/etc/ssl/certs" "$libdir" "$rootfs/tmp" \
    "$rootfs/home/$user" "$rootfs/cache"
cp -P "$app"/* "$rootfs/app/"
cp "$entrypoint" "$rootfs/app/entrypoint.sh"
cp "${entrypoint%/*}/healthcheck.sh" "$rootfs/app/healthcheck.sh"
chmod 0755 "$rootfs/app/entrypoint.sh" "$rootfs/app/healthcheck.sh"

# Mesa's manifests name their driver by a bare file name (one manifest for every architecture:
# the package is Multi-Arch: same), which the loader's dlopen finds in /lib/TRIPLET.
loaded= # libraries loaded with dlopen: Vulkan drivers, ASSEMBLE_DLOPENED
for name in ${ASSEMBLE_VULKAN_DRIVERS:-}; do
    manifest=/usr/share/vulkan/icd.d/${name}_icd.json
    if [ ! -f "$manifest" ]; then
        there=$(find /usr/share/vulkan/icd.d -name '*_icd.json' 2>/dev/null | sed 's|.*/||; s|_icd\.json$||' | sort | tr '\n' ' ')
        echo "error: no Vulkan driver manifest $manifest (matrix.yaml: vulkan_drivers names $name; there are: ${there:-none})" >&2
        exit 1
    fi
    lib=$(sed -n 's/.*"library_path": *"\([^"]*\)".*/\1/p' "$manifest")
    case $lib in
        "" | */*)
            echo "error: $manifest names library_path '${lib}', expected a bare library name" >&2
            exit 1 ;;
    esac
    if ! source=$(find_lib "$lib"); then
        echo "error: the Vulkan driver $lib ($manifest) is in none of: $search" >&2
        exit 1
    fi
    mkdir -p "$rootfs${manifest%/*}"
    cp "$manifest" "$rootfs$manifest"
    printf '%s\t%s\n' "$manifest" "$manifest" >>"$origins"
    copy_lib "$source" "$lib"
    loaded="$loaded $libdir/$lib"
done

for lib in ${ASSEMBLE_DLOPENED:-}; do
    if ! source=$(find_lib "$lib"); then
        echo "error: $lib (matrix.yaml: runtime.dlopened) is in none of: $search" >&2
        exit 1
    fi
    copy_lib "$source" "$lib"
    loaded="$loaded $libdir/$lib"
done

if [ -n "${ASSEMBLE_LIBRARY_DATA:-}" ]; then
    while IFS= read -r path; do
        case $path in
            "" | /* | *..*) echo "error: $ASSEMBLE_LIBRARY_DATA lists '$path', expected a path under /usr/lib/$triplet" >&2; exit 1 ;;
        esac
        mkdir -p "$libdir/${path%/*}"
        cp "/usr/lib/$triplet/$path" "$libdir/$path"
        printf '%s\t%s\n' "/lib/$triplet/$path" "/usr/lib/$triplet/$path" >>"$origins"
    done <"$ASSEMBLE_LIBRARY_DATA"
fi

# Breadth-first over NEEDED: the server, every ggml backend module (dlopened, so their own
# dependencies such as libgomp must be here too), the Vulkan drivers and the other dlopened
# libraries, then each library copied in.
queue="$(find "$rootfs/app" -type f -name '*.so*' -o -type f -name llama-server -o -type f -name ggml-rpc-server)$loaded"
while [ -n "$queue" ]; do
    next=
    for file in $queue; do
        for lib in $(needed "$file"); do
            # Shipped next to the server (found through RUNPATH $ORIGIN) or already copied.
            if [ -e "$rootfs/app/$lib" ] || [ -e "$libdir/$lib" ]; then
                continue
            fi
            case $host_libraries in
                *" $lib "*) continue ;;
            esac
            if ! source=$(find_lib "$lib"); then
                echo "error: $file needs $lib, which is in none of: $search" >&2
                exit 1
            fi
            copy_lib "$source" "$lib"
            next="$next $libdir/$lib"
        done
    done
    queue=$next
done

interp=$("$readelf" -l "$rootfs/app/llama-server" |
    sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
if [ -z "$interp" ]; then
    echo "error: llama-server has no ELF interpreter (not dynamically linked?)" >&2
    exit 1
fi
if ! source=$(find_lib "${interp##*/}"); then
    echo "error: the ELF interpreter $interp is in none of: $search" >&2
    exit 1
fi
mkdir -p "$rootfs${interp%/*}"
cp -L "$source" "$rootfs$interp"
printf '%s\t%s\n' "$interp" "$source" >>"$origins"

cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
ln -s busybox "$rootfs/bin/wget"

cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf '%s\t%s\n' /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >>"$origins"
cat >"$rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/sbin/nologin
$user:x:$uid:$uid:llama-server:/home/$user:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<EOF
root:x:0:
$user:x:$uid:
EOF
# glibc's resolver defaults are right, but an explicit file keeps /etc/hosts in the order.
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"

chmod 1777 "$rootfs/tmp"
chown "$uid:$uid" "$rootfs/home/$user"
chmod 0755 "$rootfs/home/$user"
chown "$uid:0" "$rootfs/cache"
chmod 2775 "$rootfs/cache"
