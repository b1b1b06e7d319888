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
for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    # Known by its name, not its argv[0]: under QEMU's user-mode emulation (binfmt_misc) the
    # command line starts with the interpreter's path. `read` is a shell builtin: no process
    # per pid (each costs ~0.1 s emulated). A process may exit while we read: skip it.
    read -r name 2>/dev/null <"$dir/comm" || continue
    [ "$name" = llama-server ] || continue
    if [ -n "$lowest" ] && [ "$pid" -gt "$lowest" ]; then
        continue
    fi
    args=$(tr '\0' '\n' 2>/dev/null <"$dir/cmdline") || continue
    lowest=$pid
    port=$(printf '%s\n' "$args" | sed -n -e '/^--port$/{n;p;}' -e 's/^--port=//p' | tail -n 1)
done

exec wget -q -T 4 -O /dev/null "http://127.0.0.1:${port:-${LLAMA_ARG_PORT:-8080}}/health"
