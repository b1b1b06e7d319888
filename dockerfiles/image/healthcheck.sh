#!/bin/sh
# Docker's HEALTHCHECK: GET /health on the port llama-server really listens on, however it was
# given (`docker run IMAGE --port N`, LLAMA_SERVER_EXTRA_ARGS, LLAMA_SERVER_PORT: all become its
# --port, the last one winning as in llama-server; else LLAMA_ARG_PORT, which it reads itself;
# else 8080). Read from the server's own command line, so it cannot disagree with it. The
# server is the llama-server process with the lowest pid: in router mode its children (one per
# loaded model) listen on ports of their own. POSIX sh: busybox in the scratch images.
set -eu

port=
lowest=
for cmdline in /proc/[0-9]*/cmdline; do
    pid=${cmdline#/proc/}
    pid=${pid%/cmdline}
    # Read NUL-separated arguments one per line (a process may exit while we read: skip it).
    args=$(tr '\0' '\n' <"$cmdline" 2>/dev/null) || continue
    case $(printf '%s\n' "$args" | head -n 1) in
        llama-server | */llama-server) ;;
        *) continue ;;
    esac
    if [ -n "$lowest" ] && [ "$pid" -gt "$lowest" ]; then
        continue
    fi
    lowest=$pid
    port=$(printf '%s\n' "$args" | sed -n -e '/^--port$/{n;p;}' -e 's/^--port=//p' | tail -n 1)
done

exec wget -q -T 4 -O /dev/null "http://127.0.0.1:${port:-${LLAMA_ARG_PORT:-8080}}/health"
