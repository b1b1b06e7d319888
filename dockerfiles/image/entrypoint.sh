#!/bin/sh
# Starts llama-server from the image's environment knobs (see the README's "Running" table).
# POSIX sh: the cpu image's shell is busybox. Every failure is one line on stderr, exit 64.
#
#   LLAMA_MODEL               path of a mounted GGUF                       -> --model
#   LLAMA_HF_REPO             <user>/<repo>[:quant] on the Hugging Face Hub -> --hf-repo
#   LLAMA_MODELS_DIR          a mounted directory of GGUFs: router mode     -> --models-dir
#                             (every model listed, each loaded on its first request)
#   LLAMA_OLLAMA_MODELS       Ollama's store (~/.ollama/models) mounted: router mode over its
#                             models, named as Ollama names them (smollm2:135m)
#   LLAMA_HF_FILE             a file in that repo                           -> --hf-file
#   LLAMA_HF_REVISION         a commit, tag or branch of LLAMA_HF_REPO (needs LLAMA_HF_FILE):
#                             -> LLAMA_ARG_MODEL_URL=<endpoint>/<repo>/resolve/<revision>/<file>
#                                --model <llama.cpp's cache>/<repo>_<revision>_<file>
#                             (a `/` in the revision, as in refs/pr/1, sent and stored as %2F)
#   LLAMA_HF_TOKEN            exported as HF_TOKEN, which llama-server reads (never an argument)
#   LLAMA_SERVER_HOST         --host, default 0.0.0.0 (unless LLAMA_ARG_HOST is set: it is used)
#   LLAMA_SERVER_PORT         --port, default 8080 (unless LLAMA_ARG_PORT is set: it is used)
#   LLAMA_SERVER_EXTRA_ARGS   more options, split on whitespace
#   LLAMA_ALLOW_CPU           1: a CUDA or ROCm image without a usable GPU (or with a driver
#                             too old) runs on its CPU kernels, with a warning, instead of
#                             refusing
#   LLAMA_METRICS             0: no Prometheus /metrics endpoint (served by default)
#   LLAMA_CACHE               where downloads go (llama.cpp reads it): the image's /cache volume
#   <NAME>_FILE               for LLAMA_HF_TOKEN, LLAMA_API_KEY and MODEL_ENDPOINT (a mirror's
#                             URL with its password): the secret read from that
#                             file (a Docker/Compose secret), not kept in the environment
#                             (llama-server reads LLAMA_ARG_API_KEY_FILE itself)
#   LLAMA_ARG_*               llama-server's own options by environment, passed through untouched
#   `docker run IMAGE ARGS`   appended last, so they win over everything above
#   `docker run IMAGE CMD`    a first argument that is not an option is a command: it runs
#                             instead of the server (`sh`, `ls /app`), as official images do
#   `docker run IMAGE doctor [--model PATH] [--json]`: what this container sees (below)
#   `docker run IMAGE rpc-worker [options]` (or LLAMA_ROLE=rpc-worker): a worker of llama.cpp's
#                             RPC backend (ggml-rpc-server), on LLAMA_RPC_PORT (default 50052)
#                             of this container's private-network address (or LLAMA_RPC_HOST)
#   LLAMA_RPC_WORKERS         host:port,... of running workers: the model is split over them
#                             (--rpc); each must answer when the server starts
#
# CUDA images set LLAMA_GPU_BACKEND=cuda, LLAMA_CUDA_VERSION, LLAMA_CUDA_MIN_DRIVER and
# LLAMA_CUDA_INSTEAD (the tag suffix for older drivers); ROCm images LLAMA_GPU_BACKEND=rocm:
# without them nothing is checked.
set -eu

# llama-server sits beside this script (/app in every image).
case $0 in
    */*) server=${0%/*}/llama-server ;;
    *) server=./llama-server ;;
esac

die() {
    printf 'llama-server image: %s\n' "$*" >&2
    exit 64
}

warn() {
    printf 'llama-server image: warning: %s\n' "$*" >&2
}

# The host's NVIDIA driver version: the kernel module's (with --gpus), else the version in the
# name of the libcuda.so.<version> the NVIDIA Container Toolkit mounted; empty when neither.
nvidia_driver() {
    if [ -r /proc/driver/nvidia/version ]; then
        sed -n 's/.*Kernel Module[^0-9]*\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version | head -n 1
        return
    fi
    for lib in /usr/lib/*/libcuda.so.*.* /usr/lib64/libcuda.so.*.* /usr/lib/libcuda.so.*.* \
        /lib/*/libcuda.so.*.*; do
        if [ -e "$lib" ]; then
            printf '%s\n' "${lib##*/libcuda.so.}"
            return
        fi
    done
}

# Whether dotted version $1 is older than $2.
older() {
    [ "$(printf '%s\n%s\n' "$1" "$2" | awk -F. '
        NR == 1 { for (i = 1; i <= NF; i++) a[i] = $i; na = NF }
        NR == 2 { for (i = 1; i <= (NF > na ? NF : na); i++) {
            x = (i <= na ? a[i] : 0) + 0; y = (i <= NF ? $i : 0) + 0
            if (x < y) { print "older"; exit } if (x > y) { print "newer"; exit } }
            print "same" }')" = older ]
}

# A CUDA image on a host without a visible GPU would quietly serve from its CPU kernels, and
# on a driver too old for its CUDA it would fail deep in the server: say so first, in a line.
check_cuda_host() {
    [ "${LLAMA_GPU_BACKEND:-}" = cuda ] || return 0
    driver=$(nvidia_driver)
    wanted=${LLAMA_CUDA_MIN_DRIVER:-0}
    if [ -n "$driver" ] && older "$driver" "$wanted"; then
        instead=
        if [ -n "${LLAMA_CUDA_INSTEAD:-}" ]; then
            instead=", or use the image's -${LLAMA_CUDA_INSTEAD} tags, which run on older drivers"
        fi
        message="the host's NVIDIA driver is $driver, but CUDA ${LLAMA_CUDA_VERSION:-} needs $wanted or newer: update the driver$instead"
        if [ "${LLAMA_ALLOW_CPU:-}" = 1 ]; then
            warn "$message; LLAMA_ALLOW_CPU=1: running on the CPU"
            return 0
        fi
        die "$message (or set LLAMA_ALLOW_CPU=1 to run on the CPU)"
    fi
    if [ -e /dev/nvidiactl ] || [ -n "$driver" ]; then
        return 0
    fi
    if [ "${LLAMA_ALLOW_CPU:-}" = 1 ]; then
        warn "no NVIDIA GPU is visible; LLAMA_ALLOW_CPU=1: running on the CPU (slow)"
        return 0
    fi
    die "no NVIDIA GPU is visible in this container: run it with --gpus all on a host with the NVIDIA driver and the NVIDIA Container Toolkit, or set LLAMA_ALLOW_CPU=1 to run on the CPU (slow)"
}

# A ROCm image needs the host's AMD GPU as devices (/dev/kfd, the compute interface, and the
# render nodes under /dev/dri) that the server's user may open: without them the HIP runtime
# finds no GPU and the server quietly runs on the CPU. Say which, in a line.
# rocm_problem prints what is wrong (nothing when the GPU is usable); doctor says the same.
rocm_problem() {
    if [ ! -e /dev/kfd ]; then
        echo "no AMD GPU is visible in this container (no /dev/kfd): run it with --device /dev/kfd --device /dev/dri on a host with the amdgpu driver"
    elif [ ! -r /dev/kfd ] || [ ! -w /dev/kfd ]; then
        echo "/dev/kfd is visible but user $(id -u) may not open it: add --group-add $(stat -c %g /dev/kfd) (the group owning /dev/kfd on the host; /dev/dri's render nodes need theirs, usually the same or render)"
    fi
}

check_rocm_host() {
    [ "${LLAMA_GPU_BACKEND:-}" = rocm ] || return 0
    message=$(rocm_problem)
    [ -n "$message" ] || return 0
    if [ "${LLAMA_ALLOW_CPU:-}" = 1 ]; then
        warn "$message; LLAMA_ALLOW_CPU=1: running on the CPU (slow)"
        return 0
    fi
    die "$message, or set LLAMA_ALLOW_CPU=1 to run on the CPU (slow)"
}

# `docker run IMAGE doctor [--model PATH] [--ctx-size N] [--json]`: what this container sees,
# one fact a line (or one JSON object): the backends llama-server loads and the CPU kernels ggml
# picked (the best variant the CPU's features allow), the GPU devices and driver, the memory it
# may use, and, given a model, whether its weights and KV cache at that context (llama-server's
# default: the model's own) fit in that memory. Exit 1 when the server would not run here: a
# CUDA image without a usable GPU, or a model larger than the memory.
# A GGUF's attention shape from its metadata: "layers context_length kv_heads_over_layers
# key_length value_length"; "more" when its first BYTES end inside the metadata before the
# tokenizer's keys (the architecture's come first); empty when the file is not GGUF v2+ or the
# keys are not there. kv_heads_over_layers is head_count_kv summed over the layers (a
# per-layer array, or the one value times the layers).
gguf_attention() { # PATH BYTES
    head -c "$2" "$1" | od -An -v -tu1 | awk '
        { for (i = 1; i <= NF; i++) b[n++] = $i }
        function u(at, len,   v, i, m) {
            v = 0; m = 1
            for (i = 0; i < len; i++) { v += b[at + i] * m; m *= 256 }
            return v
        }
        function text(at, len,   s, i) {
            s = ""
            for (i = 0; i < len && at + i < n; i++) s = s sprintf("%c", b[at + i])
            return s
        }
        END {
            # "GGUF", little-endian version >= 2 (64-bit counts)
            if (n < 24 || u(0, 4) != 1179993927 || u(4, 4) < 2) exit
            size[0] = 1; size[1] = 1; size[7] = 1; size[2] = 2; size[3] = 2
            size[4] = 4; size[5] = 4; size[6] = 4; size[10] = 8; size[11] = 8; size[12] = 8
            pairs = u(16, 8); p = 24
            for (k = 0; k < pairs && p + 12 <= n; k++) {
                len = u(p, 8); key = text(p + 8, len); p += 8 + len
                if (key ~ /^tokenizer\./) { stopped = 1; break }
                type = u(p, 4); p += 4
                count = 1; sum = 0; top = 0
                if (type == 9) { type = u(p, 4); count = u(p + 4, 8); p += 12 }
                for (j = 0; j < count && p < n; j++) {
                    if (type == 8) { len = u(p, 8); value = text(p + 8, len); p += 8 + len; continue }
                    if (!(type in size)) exit
                    v = (type == 6 || type == 12) ? 0 : u(p, size[type])
                    sum += v; if (v > top) top = v
                    p += size[type]
                }
                if (key == "general.architecture") arch = value
                else fact[key] = (type == 8) ? value : sum
                top_of[key] = top; count_of[key] = count
            }
            if (!stopped && (k < pairs || p > n)) { print "more"; exit }
            layers = fact[arch ".block_count"] + 0
            heads = top_of[arch ".attention.head_count"] + 0
            kv = arch ".attention.head_count_kv"
            kv_heads = (kv in fact) ? fact[kv] : fact[arch ".attention.head_count"]
            if (((kv in fact) ? count_of[kv] : count_of[arch ".attention.head_count"]) == 1) kv_heads *= layers
            key_length = fact[arch ".attention.key_length"] + 0
            if (key_length == 0 && heads > 0) key_length = int(fact[arch ".embedding_length"] / heads)
            value_length = fact[arch ".attention.value_length"] + 0
            if (value_length == 0) value_length = key_length
            if (layers > 0 && kv_heads > 0 && key_length > 0)
                printf "%d %d %d %d %d\n", layers, fact[arch ".context_length"], kv_heads, key_length, value_length
        }'
}

json_text() { # a JSON string's inside: backslashes and quotes escaped
    printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'
}
doctor() {
    json=false doctor_model='' doctor_ctx=''
    while [ "$#" -gt 0 ]; do
        case $1 in
            --json) json=true ;;
            -m | --model) [ "$#" -ge 2 ] || die "doctor: $1 needs a path"; doctor_model=$2; shift ;;
            --model=*) doctor_model=${1#--model=} ;;
            -c | --ctx-size) [ "$#" -ge 2 ] || die "doctor: $1 needs a number of tokens"; doctor_ctx=$2; shift ;;
            --ctx-size=*) doctor_ctx=${1#--ctx-size=} ;;
            *) die "doctor: unknown option $1 (usage: doctor [--model PATH] [--ctx-size N] [--json])" ;;
        esac
        shift
    done
    case $doctor_ctx in
        *[!0-9]* | ?????????*) die "doctor: --ctx-size $doctor_ctx is not a number of tokens (0: the model's own)" ;;
    esac
    problems=
    # The backend modules the image carries (ggml loads each one whose device is there; of
    # several CPU variants, the best this CPU's features allow: its loader names the one it
    # took, at -v) and the devices llama-server finds.
    backends=
    for module in "${server%/*}"/libggml-*.so; do
        [ -e "$module" ] || continue
        case ${module##*/} in libggml-base.so) continue ;; esac
        backends="${backends:+$backends, }${module##*/libggml-}"
    done
    backends=$(printf '%s' "$backends" | sed 's/\.so//g')
    listing=$("$server" -v --list-devices 2>&1) || true
    cpu_variant=$(printf '%s\n' "$listing" | sed -n 's|.*loaded CPU backend from .*/libggml-\(cpu[a-z0-9_-]*\)\.so.*|\1|p' | head -n 1)
    case $cpu_variant in cpu-*) cpu_variant=${cpu_variant#cpu-} ;; cpu) cpu_variant="one set, built in" ;; esac
    devices=$(printf '%s\n' "$listing" | sed -n '/Available devices/,$p' | sed -n 's/^ \{1,\}//p' | grep -v '^(none)$' |
        tr '\n' ';' | sed 's/;$//; s/;/; /g')
    cpu_kernels=$(printf '%s\n' "$backends" | tr ',' '\n' | sed -n 's/^ *cpu-\([a-z0-9_]*\)$/\1/p' | tr '\n' ' ' | sed 's/ $//')
    cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
    features=$(sed -n 's/^\(flags\|Features\)[[:space:]]*: //p' /proc/cpuinfo | head -n 1 | tr ' ' '\n' |
        grep -E '^(sse4_2|avx|avx2|fma|f16c|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_tile|asimd|asimddp|sve|sve2|i8mm)$' |
        tr '\n' ' ' | sed 's/ $//')
    # cgroup v2, else v1 (whose "no limit" is a huge number): the smaller of it and MemTotal.
    limit=$(cat /sys/fs/cgroup/memory.max 2>/dev/null ||
        cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || echo max)
    total=$(($(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo) * 1024))
    memory=$total memory_from="the host's MemTotal"
    case $limit in
        max | '' | *[!0-9]*) ;;
        *) if [ "${#limit}" -lt 19 ] && [ "$limit" -lt "$total" ]; then
            memory=$limit memory_from="the container's cgroup limit"
        fi ;;
    esac
    gpus=
    for node in /dev/nvidia[0-9]* /dev/dri/renderD* /dev/kfd; do
        [ -e "$node" ] && gpus="${gpus:+$gpus }$node"
    done
    driver=$(nvidia_driver)
    gpu_verdict=
    if [ "${LLAMA_GPU_BACKEND:-}" = cuda ]; then
        gpu_verdict="CUDA ${LLAMA_CUDA_VERSION:-} needs driver ${LLAMA_CUDA_MIN_DRIVER:-0}+"
        if [ -z "$driver" ] && [ ! -e /dev/nvidiactl ]; then
            gpu_verdict="$gpu_verdict: no NVIDIA GPU visible (run with --gpus all)"
            if [ "${LLAMA_ALLOW_CPU:-}" = 1 ]; then
                gpu_verdict="$gpu_verdict; LLAMA_ALLOW_CPU=1: the server runs on the CPU"
            else
                problems="$problems no-gpu"
            fi
        elif [ -n "$driver" ] && older "$driver" "${LLAMA_CUDA_MIN_DRIVER:-0}"; then
            gpu_verdict="$gpu_verdict: driver $driver is too old"
            [ "${LLAMA_ALLOW_CPU:-}" = 1 ] || problems="$problems old-driver"
        else
            gpu_verdict="$gpu_verdict: driver ${driver:-present} accepted"
        fi
    elif [ "${LLAMA_GPU_BACKEND:-}" = rocm ]; then
        problem=$(rocm_problem)
        gpu_verdict="ROCm: ${problem:-/dev/kfd usable}"
        if [ -n "$problem" ]; then
            if [ "${LLAMA_ALLOW_CPU:-}" = 1 ]; then
                gpu_verdict="$gpu_verdict; LLAMA_ALLOW_CPU=1: the server runs on the CPU"
            else
                problems="$problems no-gpu"
            fi
        fi
    fi
    model_verdict=
    if [ -n "$doctor_model" ]; then
        if [ ! -f "$doctor_model" ]; then
            model_verdict="$doctor_model: no such file"
            problems="$problems model-missing"
        elif [ "$(head -c 4 "$doctor_model")" != GGUF ]; then
            model_verdict="$doctor_model: not a GGUF file"
            problems="$problems not-gguf"
        else
            weights=$(wc -c <"$doctor_model" | tr -d ' ')
            # The KV cache: K and V (f16, llama-server's default type) for every token of the
            # context in every layer; the compute buffers come on top (tens of MiB).
            facts=$(gguf_attention "$doctor_model" 16384)
            [ "$facts" != more ] || facts=$(gguf_attention "$doctor_model" 1048576)
            [ "$facts" != more ] || facts=
            kv_cache='' need=$weights
            if [ -n "$facts" ]; then
                # shellcheck disable=SC2086 # five numbers
                set -- $facts
                ctx=${doctor_ctx:-0}
                [ "$ctx" -gt 0 ] || ctx=$2
                kv_cache=$((ctx * $3 * ($4 + $5) * 2))
                need=$((weights + kv_cache))
                parts="weights $weights + KV cache $kv_cache (ctx $ctx, f16) = $need bytes"
            else
                parts="weights $weights bytes (KV cache not estimated: no attention shape in the GGUF's metadata)"
            fi
            if [ "$need" -gt "$memory" ]; then
                model_verdict="$parts > memory $memory bytes: does not fit"
                problems="$problems model-too-large"
            else
                model_verdict="$parts <= memory $memory bytes: fits"
            fi
        fi
    fi
    problems=${problems# }
    if [ "$json" = true ]; then
        ok=false
        [ -n "$problems" ] || ok=true
        printf '{"backends": "%s", "cpu_kernels": "%s", "cpu_variant": "%s", "cpu": "%s", "cpu_features": "%s", "devices": "%s", "gpu_devices": "%s", "nvidia_driver": "%s", "gpu": "%s", "memory_bytes": %s, "memory_from": "%s", "model": "%s", "kv_cache_bytes": %s, "problems": "%s", "ok": %s}\n' \
            "$(json_text "$backends")" "$(json_text "$cpu_kernels")" "$cpu_variant" "$(json_text "$cpu_model")" \
            "$features" "$(json_text "$devices")" "$gpus" "$driver" "$(json_text "$gpu_verdict")" \
            "$memory" "$memory_from" "$(json_text "$model_verdict")" "${kv_cache:-null}" "$problems" "$ok"
    else
        printf 'backends: %s\n' "${backends:-none}"
        if [ -n "$cpu_kernels" ]; then
            printf 'cpu kernels: %s (of %s: the best variant this CPU supports; %s: %s)\n' \
                "${cpu_variant:-none loaded}" "$cpu_kernels" "${cpu_model:-this CPU}" "${features:-no SIMD extensions}"
        else
            printf 'cpu kernels: one set, built in (%s: %s)\n' "${cpu_model:-this CPU}" "${features:-no SIMD extensions}"
        fi
        printf 'devices: %s\n' "${devices:-none besides the CPU}"
        printf 'gpu devices: %s; nvidia driver: %s\n' "${gpus:-none}" "${driver:-none}"
        [ -z "$gpu_verdict" ] || printf 'gpu: %s\n' "$gpu_verdict"
        printf 'memory: %s bytes (%s)\n' "$memory" "$memory_from"
        [ -z "$model_verdict" ] || printf 'model: %s\n' "$model_verdict"
        printf 'verdict: %s\n' "${problems:-ok}"
    fi
    [ -z "$problems" ]
}
if [ "${1:-}" = doctor ]; then
    shift
    doctor "$@" && exit 0
    exit 1
fi

# A port as llama-server would take it: 1-65535, digits only.
check_port() {
    case $2 in
        '' | *[!0-9]* | 0*) die "$1=$2 is not a port number (1-65535)" ;;
    esac
    [ "$2" -le 65535 ] || die "$1=$2 is not a port number (1-65535)"
}

# `docker run IMAGE rpc-worker [ggml-rpc-server options]`, or LLAMA_ROLE=rpc-worker: one of the
# machines llama.cpp's RPC backend splits a model over (the server names its workers in
# LLAMA_RPC_WORKERS). ggml-rpc-server has no authentication: it listens on this container's
# private-network address (10/8, 172.16/12, 192.168/16: a Docker network's, or a private LAN's
# with --network host), never on a public one, unless LLAMA_RPC_HOST names one explicitly.
rpc_worker() {
    host=${LLAMA_RPC_HOST:-} port=${LLAMA_RPC_PORT:-50052} chosen=
    check_port LLAMA_RPC_PORT "$port"
    if [ -z "$host" ]; then
        # The kernel's own table of this network namespace's addresses: no tool needed.
        host=$(awk '/\|--/ { ip = $2 }
            /\/32 host LOCAL/ && ip ~ /^(10\.|192\.168\.|172\.(1[6-9]|2[0-9]|3[01])\.)/ { print ip; exit }' \
            /proc/net/fib_trie 2>/dev/null)
        [ -n "$host" ] || die "rpc-worker: this container has no private-network address (10/8, 172.16/12, 192.168/16) to listen on, and ggml-rpc-server has no authentication; run it on a Docker or private network, or set LLAMA_RPC_HOST to the address to listen on"
        chosen="this container's private-network address; no authentication: publish the port to no one else"
    else
        chosen="LLAMA_RPC_HOST, your choice; ggml-rpc-server has no authentication"
    fi
    printf 'llama-server image: rpc-worker: ggml-rpc-server on %s:%s (%s)\n' "$host" "$port" "$chosen" >&2
    exec "${server%/*}/ggml-rpc-server" --host "$host" --port "$port" "$@"
}
case ${LLAMA_ROLE:-server} in
    server) ;;
    rpc-worker) [ "${1:-}" = rpc-worker ] || set -- rpc-worker "$@" ;;
    *) die "LLAMA_ROLE=$LLAMA_ROLE: server (the default) or rpc-worker" ;;
esac
if [ "${1:-}" = rpc-worker ]; then
    shift
    rpc_worker "$@"
fi

# `docker run IMAGE sh` (any first argument that is not an option) runs that command, as
# Docker's official images do: llama-server takes no positional arguments.
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

# <NAME>_FILE: the secret read from a file (a mounted Docker or Compose secret), so that it is
# in neither `docker inspect` nor the process list. Exported under its own name for whoever
# reads it (HF_TOKEN below; llama-server reads LLAMA_API_KEY itself).
secret_from_file() {
    eval "value=\${$1:-} path=\${$1_FILE:-}"
    [ -n "$path" ] || return 0
    if [ -n "$value" ]; then
        die "$1 and $1_FILE are both set; set one of them"
    fi
    if [ ! -r "$path" ] || [ -d "$path" ]; then
        die "$1_FILE=$path: no readable file in the container; mount the secret there (docker run --mount type=bind,src=FILE,dst=$path,readonly, or a Compose secret)"
    fi
    value=$(cat "$path")
    if [ -z "$value" ]; then
        die "$1_FILE=$path is empty"
    fi
    export "$1=$value"
    unset "$1_FILE" value
}
secret_from_file LLAMA_HF_TOKEN
secret_from_file LLAMA_API_KEY
secret_from_file MODEL_ENDPOINT # a mirror's URL may carry its user:password

# A URL with its user:password (a mirror's basic auth) as ***, for messages.
redacted() {
    printf '%s' "$1" | sed 's|^\([A-Za-z][A-Za-z0-9+.-]*://\)[^/@]*@|\1***@|'
}

# A LLAMA_* variable nobody reads is most often a typo (LLAMA_MODLE): name it, then go on.
# Known: this script's knobs, the image's own, llama.cpp's (LLAMA_ARG_* and the few it reads
# by name; tests/test_build.py checks them against the snapshot's sources), and compose.yaml's,
# which reach the container too when it reads the stack's .env.
known_knobs=" LLAMA_MODEL LLAMA_HF_REPO LLAMA_HF_FILE LLAMA_HF_REVISION LLAMA_HF_TOKEN
    LLAMA_HF_TOKEN_FILE LLAMA_API_KEY_FILE LLAMA_METRICS LLAMA_ROLE LLAMA_RPC_HOST LLAMA_RPC_PORT LLAMA_RPC_WORKERS LLAMA_OLLAMA_MODELS LLAMA_MODELS_DIR LLAMA_SERVER_HOST LLAMA_SERVER_PORT LLAMA_SERVER_EXTRA_ARGS LLAMA_ALLOW_CPU
    LLAMA_GPU_BACKEND LLAMA_CUDA_VERSION LLAMA_CUDA_MIN_DRIVER LLAMA_CUDA_INSTEAD
    LLAMA_API_KEY LLAMA_CACHE LLAMA_TRACE LLAMA_MEDIA_MARKER LLAMA_APP_CMD
    LLAMA_SERVER_CHILD_MODE LLAMA_SERVER_ROUTER_PORT LLAMA_SERVER_SLOTS_N_DIFF
    LLAMA_IMAGE LLAMA_TAG LLAMA_CUDA_TAG LLAMA_PORT LLAMA_HOST_ADDRESS LLAMA_MODELS_HOST_DIR "
for name in $(export -p | sed -n 's/^export \(LLAMA_[A-Za-z0-9_]*\)=.*/\1/p'); do
    case $name in
        # llama-server's options; compose.yaml's embeddings service; llama.cpp's debug switches
        LLAMA_ARG_* | LLAMA_EMBEDDINGS_* | LLAMA_SERVER_*_DEBUG* | LLAMA_*_DEBUG | LLAMA_*_DISABLE) ;;
        *)
            case $known_knobs in
                *[[:space:]]"${name}"[[:space:]]*) ;;
                *) warn "$name is not a knob of this image and is ignored (see the README's run table)" ;;
            esac
            ;;
    esac
done

# Informational options need no model and no knobs: hand them straight to the server.
for arg in "$@"; do
    case $arg in
        -h | --help | --usage | --version | --license | --completion-bash | --list-devices | -cl | --cache-list)
            exec "$server" "$@"
            ;;
    esac
done

# The extra arguments, split on whitespace; globbing off so a `*` stays a `*`.
set -f
# shellcheck disable=SC2086 # splitting LLAMA_SERVER_EXTRA_ARGS into words is its contract
set -- ${LLAMA_SERVER_EXTRA_ARGS:-} "$@"
set +f

# Does the command line or llama-server's own environment already name a model (or the
# router's model directory)? Then the LLAMA_MODEL/LLAMA_HF_REPO requirement is met.
model_in_args=false
for arg in "$@"; do
    case $arg in
        -m | --model | --model=* | -mu | --model-url | --model-url=* | -hf | -hfr | --hf-repo | --hf-repo=* | \
            -dr | --docker-repo | --docker-repo=* | --models-dir | --models-dir=* | --models-preset | --models-preset=*)
            model_in_args=true
            ;;
    esac
done
for name in LLAMA_ARG_MODEL LLAMA_ARG_MODEL_URL LLAMA_ARG_HF_REPO LLAMA_ARG_DOCKER_REPO \
    LLAMA_ARG_MODELS_DIR LLAMA_ARG_MODELS_PRESET; do
    eval "value=\${$name:-}"
    if [ -n "$value" ]; then
        model_in_args=true
    fi
done

model=${LLAMA_MODEL:-}
repo=${LLAMA_HF_REPO:-}
file=${LLAMA_HF_FILE:-}
revision=${LLAMA_HF_REVISION:-}
models_dir=${LLAMA_MODELS_DIR:-}
ollama=${LLAMA_OLLAMA_MODELS:-}

# Ollama's store (~/.ollama/models, mounted read-only): every model its manifests name, served
# by the router under Ollama's name (smollm2:135m; a `/` becomes `_`), through a directory of
# links to its GGUF blobs: nothing is copied. pipeline/modelfiles/ollama.py reads the same way.
ollama_links() {
    links=${LLAMA_CACHE:-/tmp}/ollama-models
    rm -rf "$links"
    mkdir -p "$links" 2>/dev/null || die "LLAMA_OLLAMA_MODELS: cannot write $links; give the container a writable LLAMA_CACHE (the image's /cache volume)"
    for manifest in "$1"/manifests/*/*/*/*; do
        [ -f "$manifest" ] || continue
        path=${manifest#"$1"/manifests/}
        registry=${path%%/*} path=${path#*/}
        namespace=${path%%/*} path=${path#*/}
        name=${path%%/*} tag=${path#*/}
        if [ "$registry" != registry.ollama.ai ]; then
            name="$registry/$namespace/$name"
        elif [ "$namespace" != library ]; then
            name="$namespace/$name"
        fi
        # The model layer's digest, whichever order its keys come in.
        layers=$(tr -d ' \n\t' <"$manifest" | sed 's/},{/}\n{/g')
        digest=$(printf '%s\n' "$layers" | grep '"mediaType":"application/vnd.ollama.image.model"' |
            sed -n 's/.*"digest":"sha256:\([0-9a-f]\{64\}\)".*/\1/p' | head -n 1)
        blob="$1/blobs/sha256-$digest"
        if [ -z "$digest" ] || [ ! -f "$blob" ]; then
            warn "LLAMA_OLLAMA_MODELS: $name:$tag has no model blob in $1/blobs; skipped"
            continue
        fi
        ln -s "$blob" "$links/$(printf '%s' "$name:$tag" | tr / _).gguf"
    done
    for link in "$links"/*.gguf; do
        [ -e "$link" ] && return 0
    done
    die "LLAMA_OLLAMA_MODELS=$1 has no models (manifests/<registry>/<namespace>/<model>/<tag>); mount Ollama's models directory, e.g. -v ~/.ollama/models:/ollama:ro"
}
if [ -n "$ollama" ]; then
    if [ -n "$model" ] || [ -n "$repo" ] || [ -n "$models_dir" ]; then
        die "LLAMA_OLLAMA_MODELS serves Ollama's models; unset LLAMA_MODEL, LLAMA_HF_REPO and LLAMA_MODELS_DIR, or LLAMA_OLLAMA_MODELS"
    fi
    if [ ! -d "$ollama/manifests" ]; then
        die "LLAMA_OLLAMA_MODELS=$ollama: no manifests/ directory there; mount Ollama's models directory, e.g. -v ~/.ollama/models:/ollama:ro"
    fi
    ollama_links "$ollama"
    models_dir=$links
fi

if [ -n "$model" ] && [ -n "$repo" ]; then
    die "LLAMA_MODEL and LLAMA_HF_REPO are both set; set one of them"
fi
if [ -n "$models_dir" ] && { [ -n "$model" ] || [ -n "$repo" ]; }; then
    die "LLAMA_MODELS_DIR serves every model in a directory; unset LLAMA_MODEL and LLAMA_HF_REPO, or LLAMA_MODELS_DIR"
fi
if [ -n "$models_dir" ] && [ ! -d "$models_dir" ]; then
    die "LLAMA_MODELS_DIR=$models_dir: no such directory in the container; mount it, e.g. -v \"\$PWD/models:/models:ro\""
fi
if [ -n "$models_dir" ]; then
    # The router would start and list nothing: say so instead (a file, or a model's directory).
    found=false
    for gguf in "$models_dir"/*.gguf "$models_dir"/*/*.gguf; do
        if [ -f "$gguf" ]; then
            found=true
            break
        fi
    done
    if [ "$found" = false ]; then
        die "LLAMA_MODELS_DIR=$models_dir has no .gguf files; put models there (one file each, or a directory per model)"
    fi
fi
if [ -n "$file" ] && [ -z "$repo" ]; then
    die "LLAMA_HF_FILE is set without LLAMA_HF_REPO; set LLAMA_HF_REPO=<user>/<repo> too"
fi
if [ -n "$revision" ] && [ -z "$repo" ]; then
    die "LLAMA_HF_REVISION is set without LLAMA_HF_REPO"
fi
case $revision in
    *[!A-Za-z0-9._/-]* | [./-]* | */ | *..* | *//*)
        die "LLAMA_HF_REVISION=$revision is not a revision: give a commit, a tag, a branch or refs/pr/<n>" ;;
esac
model_url=
if [ -n "$revision" ] && [ "$revision" != main ]; then
    # llama-server's -hf follows the main branch only; a pinned revision is downloaded through
    # its model URL option, from the same endpoint (MODEL_ENDPOINT, else HF_ENDPOINT), to a
    # path named for the revision (--model: without it llama-server would start as a router).
    case $repo in
        *:*) die "LLAMA_HF_REPO=$repo: a :quant tag does not go with LLAMA_HF_REVISION; name the file with LLAMA_HF_FILE" ;;
    esac
    if [ -z "$file" ]; then
        die "LLAMA_HF_REVISION=$revision needs LLAMA_HF_FILE: the file to take from that revision"
    fi
    endpoint=${MODEL_ENDPOINT:-${HF_ENDPOINT:-https://huggingface.co}}
    # The revision as one path segment, as the Hub's clients send it (refs/pr/1 -> refs%2Fpr%2F1).
    encoded=$(printf '%s' "$revision" | sed 's|/|%2F|g')
    model_url="${endpoint%/}/$repo/resolve/$encoded/$file"
    shown=$(redacted "$model_url")
    # One line for a revision or file that does not exist (llama-server would log a page). A
    # private repository answers 401 without the token, which is never put on a command line:
    # then llama-server, which sends it, decides; so it does for an endpoint with a password.
    if [ "$shown" = "$model_url" ]; then
        status=$(wget -S --spider -T 30 "$model_url" 2>&1 | sed -n 's/^ *HTTP\/[0-9.]* \([0-9]*\).*/\1/p' | tail -n 1)
        case $status in
            404) die "LLAMA_HF_REVISION=$revision: $repo has no $file at that revision ($shown answered 404)" ;;
            '') die "LLAMA_HF_REVISION=$revision: $shown cannot be reached" ;;
        esac
    fi
    cache=${LLAMA_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/llama.cpp}
    model_path="$cache/$(printf '%s' "$repo" | sed 's|/|_|g')_${encoded}_$(printf '%s' "$file" | sed 's|/|_|g')"
fi
if [ -z "$model" ] && [ -z "$repo" ] && [ -z "$models_dir" ] && [ "$model_in_args" = false ]; then
    die "no model: set LLAMA_MODEL=/models/<file>.gguf (mount it: -v \"\$PWD/models:/models:ro\") or LLAMA_HF_REPO=<user>/<repo>[:quant]"
fi
if [ -n "$model" ] && [ ! -f "$model" ]; then
    die "LLAMA_MODEL=$model: no such file in the container; mount it, e.g. -v \"\$PWD/models:/models:ro\""
fi

if [ -n "${LLAMA_HF_TOKEN:-}" ]; then
    # llama-server reads HF_TOKEN itself; an argument would show in `ps` and `docker inspect`.
    HF_TOKEN=$LLAMA_HF_TOKEN
    export HF_TOKEN
    unset LLAMA_HF_TOKEN
fi

check_cuda_host
check_rocm_host

# Where to listen: LLAMA_SERVER_* or llama-server's own LLAMA_ARG_* (which it reads itself and
# an argument would override), never both; `--port` arguments win over either, as always.
if [ -n "${LLAMA_ARG_PORT:-}" ] && [ -n "${LLAMA_SERVER_PORT:-}" ]; then
    die "LLAMA_SERVER_PORT and LLAMA_ARG_PORT are both set; set one of them"
fi
if [ -n "${LLAMA_ARG_HOST:-}" ] && [ -n "${LLAMA_SERVER_HOST:-}" ]; then
    die "LLAMA_SERVER_HOST and LLAMA_ARG_HOST are both set; set one of them"
fi
if [ -n "${LLAMA_ARG_PORT:-}" ]; then
    check_port LLAMA_ARG_PORT "$LLAMA_ARG_PORT"
else
    check_port LLAMA_SERVER_PORT "${LLAMA_SERVER_PORT:-8080}"
fi
previous=
for arg in "$@"; do
    case $previous in
        --port) check_port --port "$arg" ;;
    esac
    case $arg in
        --port=*) check_port --port "${arg#--port=}" ;;
    esac
    previous=$arg
done

# The RPC workers the model is split over (llama.cpp's --rpc): each must answer now, or the
# server would fail deep in its model load.
if [ -n "${LLAMA_RPC_WORKERS:-}" ]; then
    for worker in $(printf '%s' "$LLAMA_RPC_WORKERS" | tr ',' ' '); do
        case $worker in
            *:*) ;;
            *) die "LLAMA_RPC_WORKERS: $worker is not host:port (e.g. worker-1:50052)" ;;
        esac
        check_port "LLAMA_RPC_WORKERS: $worker's port" "${worker##*:}"
        # A connection and an immediate end: ggml-rpc-server drops it and waits for the next.
        # It serves one client at a time: one already serving another server takes the
        # connection but never reads it.
        if ! said=$(timeout 10 nc -w 5 "${worker%:*}" "${worker##*:}" </dev/null 2>&1 >/dev/null); then
            case $said in
                *"can't connect"* | *"bad address"* | *refused* | *unreachable*)
                    die "LLAMA_RPC_WORKERS: the worker ${worker%:*} does not answer on port ${worker##*:}; start it first (docker run IMAGE rpc-worker) on a network this container shares" ;;
                *) die "LLAMA_RPC_WORKERS: the worker $worker took the connection but did not end it: a worker serves one llama-server at a time; is another server using it?" ;;
            esac
        fi
    done
    set -- --rpc "$LLAMA_RPC_WORKERS" "$@"
fi

case ${LLAMA_METRICS:-1} in
    1) set -- --metrics "$@" ;;
    0) ;;
    *) die "LLAMA_METRICS=$LLAMA_METRICS: 1 serves /metrics (the default), 0 does not" ;;
esac

# Prepended in reverse: host/port, then the model, then the extra and docker-run arguments
# already in "$@" (llama-server takes the last value of a repeated option).
if [ -n "$model_url" ]; then
    # The URL by llama-server's own variable, not an argument: a mirror's password in it would
    # show in `ps`. An explicit --model-url argument still wins.
    LLAMA_ARG_MODEL_URL=$model_url
    export LLAMA_ARG_MODEL_URL
    set -- --model "$model_path" "$@"
else
    if [ -n "$file" ]; then
        set -- --hf-file "$file" "$@"
    fi
    if [ -n "$repo" ]; then
        set -- --hf-repo "$repo" "$@"
    fi
fi
if [ -n "$model" ]; then
    set -- --model "$model" "$@"
fi
if [ -n "$models_dir" ]; then
    set -- --models-dir "$models_dir" "$@"
fi
if [ -z "${LLAMA_ARG_PORT:-}" ]; then
    set -- --port "${LLAMA_SERVER_PORT:-8080}" "$@"
fi
if [ -z "${LLAMA_ARG_HOST:-}" ]; then
    set -- --host "${LLAMA_SERVER_HOST:-0.0.0.0}" "$@"
fi

exec "$server" "$@"
