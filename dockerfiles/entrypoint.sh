#!/bin/sh
# Starts llama-server from the image's environment knobs (see the README's "Running" table).
# POSIX sh: the cpu image's shell is busybox. Every failure is one line on stderr, exit 64.
#
#   LLAMA_MODEL               path of a mounted GGUF                       -> --model
#   LLAMA_HF_REPO             <user>/<repo>[:quant] on the Hugging Face Hub -> --hf-repo
#   LLAMA_HF_FILE             a file in that repo                           -> --hf-file
#   LLAMA_HF_REVISION         only "main": llama-server always downloads the repo's main branch
#   LLAMA_HF_TOKEN            exported as HF_TOKEN, which llama-server reads (never an argument)
#   LLAMA_SERVER_HOST         --host, default 0.0.0.0
#   LLAMA_SERVER_PORT         --port, default 8080
#   LLAMA_SERVER_EXTRA_ARGS   more options, split on whitespace
#   `docker run IMAGE ARGS`   appended last, so they win over everything above
set -eu

server=${LLAMA_SERVER_BIN:-/app/llama-server}

die() {
    printf 'llama-server image: %s\n' "$*" >&2
    exit 64
}

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

if [ -n "$model" ] && [ -n "$repo" ]; then
    die "LLAMA_MODEL and LLAMA_HF_REPO are both set; set one of them"
fi
if [ -n "$file" ] && [ -z "$repo" ]; then
    die "LLAMA_HF_FILE is set without LLAMA_HF_REPO; set LLAMA_HF_REPO=<user>/<repo> too"
fi
if [ -n "$revision" ] && [ "$revision" != main ]; then
    die "LLAMA_HF_REVISION=$revision is not supported: llama-server downloads the repo's main branch only; unset it, or download that revision on the host and mount it with LLAMA_MODEL"
fi
if [ -n "$revision" ] && [ -z "$repo" ]; then
    die "LLAMA_HF_REVISION is set without LLAMA_HF_REPO"
fi
if [ -z "$model" ] && [ -z "$repo" ] && [ "$model_in_args" = false ]; then
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

port=${LLAMA_SERVER_PORT:-8080}
case $port in
    '' | *[!0-9]*) die "LLAMA_SERVER_PORT=$port is not a port number" ;;
esac
host=${LLAMA_SERVER_HOST:-0.0.0.0}

# Prepended in reverse: host/port, then the model, then the extra and docker-run arguments
# already in "$@" (llama-server takes the last value of a repeated option).
if [ -n "$file" ]; then
    set -- --hf-file "$file" "$@"
fi
if [ -n "$repo" ]; then
    set -- --hf-repo "$repo" "$@"
fi
if [ -n "$model" ]; then
    set -- --model "$model" "$@"
fi
set -- --host "$host" --port "$port" "$@"

exec "$server" "$@"
