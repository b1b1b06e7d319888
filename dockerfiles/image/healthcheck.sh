#!/bin/sh
# Docker's HEALTHCHECK: GET /health on the port llama-server really listens on, however it was
# given (`docker run IMAGE --port N`, LLAMA_SERVER_EXTRA_ARGS, LLAMA_SERVER_PORT: all become its
# --port, the last one winning as in llama-server; else LLAMA_ARG_PORT, which it reads itself;
# else 8080). Read from the server's own command line, so it cannot disagree with it. The
# server is the llama-server process with the lowest pid: in router mode its children (one per
# loaded model) listen on ports of their own. An RPC worker (`rpc-worker`: ggml-rpc-server,
# which speaks no HTTP) is healthy while it listens on its port. POSIX sh: busybox in the
# scratch images.
set -eu

port=
lowest=
for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    # Known by its name, not its argv[0]: under QEMU's user-mode emulation (binfmt_misc) the
    # command line starts with the interpreter's path. `read` is a shell builtin: no process
    # per pid (each costs ~0.1 s emulated). A process may exit while we read: skip it.
    read -r name 2>/dev/null <"$dir/comm" || continue
    case $name in
        ggml-rpc-server)
            args=$(tr '\0' '\n' 2>/dev/null <"$dir/cmdline") || continue
            port=$(printf '%s\n' "$args" | sed -n '/^--port$/{n;p;}' | tail -n 1)
            # Listening on its port (state 0A): it serves one client at a time, so a probe's
            # connection would wait behind the server it serves.
            exec awk -v port=":$(printf '%04X' "${port:-50052}")" \
                '$4 == "0A" && substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
                /proc/net/tcp /proc/net/tcp6
            ;;
        llama-server) ;;
        *) continue ;;
    esac
    if [ -n "$lowest" ] && [ "$pid" -gt "$lowest" ]; then
        continue
    fi
    args=$(tr '\0' '\n' 2>/dev/null <"$dir/cmdline") || continue
    lowest=$pid
    port=$(printf '%s\n' "$args" | sed -n -e '/^--port$/{n;p;}' -e 's/^--port=//p' | tail -n 1)
done

exec wget -q -T 4 -O /dev/null "http://127.0.0.1:${port:-${LLAMA_ARG_PORT:-8080}}/health"
