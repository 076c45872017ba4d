#!/usr/bin/env bash
# Starts (or stops) procpool nodes on a list of hosts over ssh: on each host, the
# application's own binary started in the background with PROCPOOL_NODE set, so that
# it serves remote pools instead of running main() (see DEPLOY.md).
#
# Usage:
#   PROCPOOL_NODE=redis://procpool-node:PASSWORD@redis.example:6379 \
#   PROCPOOL_KEY_FILE=./procpool.key PROCPOOL_NAMESPACE=thumbs \
#   deploy/ssh/start-nodes.sh -a /opt/myapp/bin/myapp host1 host2
#   deploy/ssh/start-nodes.sh -a /opt/myapp/bin/myapp -f hosts.txt   # one host a line
#   PROCPOOL_NAMESPACE=thumbs deploy/ssh/start-nodes.sh -x host1     # drain and stop
#
#   -a APP       the application binary on the hosts (the very build the parents run)
#   -f FILE      hosts, one a line (blank lines and # comments skipped), besides any
#                given as arguments
#   -x           stop instead: SIGTERM to each host's node, which drains and exits
#
# Environment (of this script; nothing else of it reaches the hosts):
#   PROCPOOL_NODE              Redis URL                                 required
#   PROCPOOL_KEY_FILE          local HMAC key file, copied to each host  required, unless
#   PROCPOOL_REMOTE_KEY_FILE   the key file already on the hosts (then nothing is copied)
#   PROCPOOL_NAMESPACE         default: default
#   PROCPOOL_NODE_PROCESSES    default: the host's available cores
#   PROCPOOL_NODE_GRACE        drain seconds on SIGTERM, default: 30
#   PROCPOOL_REMOTE_DIR        where each host keeps the key, log and pid file, relative
#                              to the remote home unless absolute;
#                              default: .procpool/<namespace>
#
# Secrets never go on a command line (which every user of either machine can read in
# ps): the key travels as ssh's standard input into a 0600 file, and the node's settings
# (the URL may hold a password) as a script on standard input to `sh -s`.
# PROCPOOL_KEY is not used: a node started here reads its key from the file.
# ssh runs with BatchMode (no prompts): set up keys and options in ~/.ssh/config.

set -euo pipefail

die() {
    printf 'start-nodes: %s\n' "$*" >&2
    exit 2
}

# $1 quoted for a POSIX shell: in single quotes, each ' written as '\''.
quote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

app=
stop=false
hosts=()
while getopts 'a:f:xh' opt; do
    case $opt in
        a) app=$OPTARG ;;
        f)
            [ -r "$OPTARG" ] || die "cannot read the host file $OPTARG"
            while IFS= read -r line || [ -n "$line" ]; do
                line=${line%%#*}
                line=${line//[[:space:]]/}
                [ -n "$line" ] && hosts+=("$line")
            done <"$OPTARG"
            ;;
        x) stop=true ;;
        h)
            sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
            exit 0
            ;;
        *) die "usage: start-nodes.sh -a APP [-f HOSTFILE] [-x] [HOST...]" ;;
    esac
done
shift $((OPTIND - 1))
hosts+=("$@")
[ "${#hosts[@]}" -gt 0 ] || die "no host given"

namespace=${PROCPOOL_NAMESPACE:-default}
remote_dir=${PROCPOOL_REMOTE_DIR:-.procpool/$namespace}

run_ssh() {
    # run_ssh HOST COMMAND: the command runs in the remote user's shell.
    ssh -T -o BatchMode=yes -- "$1" "$2"
}

if $stop; then
    # The $ in single quotes are the remote shell's, on purpose.
    # shellcheck disable=SC2016
    script="dir=$(quote "$remote_dir")"'
cd -- "$dir" 2>/dev/null && [ -f node.pid ] || { echo "no node started here"; exit 0; }
pid=$(cat node.pid)
if kill -TERM "$pid" 2>/dev/null; then
    echo "node $pid on $(hostname): SIGTERM sent; it drains, then exits"
else
    echo "node $pid on $(hostname) is not running"
fi
rm -f node.pid
'
    for host in "${hosts[@]}"; do
        printf '%s' "$script" | run_ssh "$host" 'sh -s' || printf 'start-nodes: %s: failed\n' "$host" >&2
    done
    exit 0
fi

[ -n "$app" ] || die "-a APP is required: the application binary on the hosts"
[ -n "${PROCPOOL_NODE:-}" ] || die "set PROCPOOL_NODE to the Redis URL"
copy_key=true
if [ -n "${PROCPOOL_REMOTE_KEY_FILE:-}" ]; then
    copy_key=false
else
    [ -n "${PROCPOOL_KEY_FILE:-}" ] || die "set PROCPOOL_KEY_FILE (or PROCPOOL_REMOTE_KEY_FILE)"
    [ -r "$PROCPOOL_KEY_FILE" ] || die "cannot read the key file $PROCPOOL_KEY_FILE"
    [ -s "$PROCPOOL_KEY_FILE" ] || die "the key file $PROCPOOL_KEY_FILE is empty"
fi

# The script each host's `sh -s` runs. Values are quoted here; nothing is expanded
# locally inside the remote part.
script="set -eu
umask 077
dir=$(quote "$remote_dir")
app=$(quote "$app")
PROCPOOL_NODE=$(quote "$PROCPOOL_NODE")
PROCPOOL_NAMESPACE=$(quote "$namespace")
"
if [ -n "${PROCPOOL_NODE_PROCESSES:-}" ]; then
    script+="PROCPOOL_NODE_PROCESSES=$(quote "$PROCPOOL_NODE_PROCESSES")
export PROCPOOL_NODE_PROCESSES
"
fi
if [ -n "${PROCPOOL_NODE_GRACE:-}" ]; then
    script+="PROCPOOL_NODE_GRACE=$(quote "$PROCPOOL_NODE_GRACE")
export PROCPOOL_NODE_GRACE
"
fi
if $copy_key; then
    script+='PROCPOOL_KEY_FILE=key
'
else
    script+="PROCPOOL_KEY_FILE=$(quote "$PROCPOOL_REMOTE_KEY_FILE")
"
fi
# The $ in single quotes are the remote shell's, on purpose.
# shellcheck disable=SC2016
script+='export PROCPOOL_NODE PROCPOOL_NAMESPACE PROCPOOL_KEY_FILE
unset PROCPOOL_KEY
mkdir -p -- "$dir"
cd -- "$dir"
dir=$(pwd)
case $PROCPOOL_KEY_FILE in /*) ;; *) PROCPOOL_KEY_FILE="$dir/$PROCPOOL_KEY_FILE" ;; esac
[ -r "$PROCPOOL_KEY_FILE" ] || { echo "cannot read the key file $PROCPOOL_KEY_FILE" >&2; exit 2; }
[ -x "$app" ] || { echo "$app is not an executable file" >&2; exit 2; }
if [ -f node.pid ] && kill -0 "$(cat node.pid)" 2>/dev/null; then
    echo "a node runs here already (pid $(cat node.pid)); stop it first (-x)" >&2
    exit 1
fi
if command -v setsid >/dev/null 2>&1; then
    nohup setsid "$app" </dev/null >>node.log 2>&1 &
else
    nohup "$app" </dev/null >>node.log 2>&1 &
fi
echo "$!" >node.pid
echo "node $! started on $(hostname); log: $dir/node.log"
'

failed=0
for host in "${hosts[@]}"; do
    if $copy_key; then
        # Into a file only this user reads, made before the key is written to it.
        if ! run_ssh "$host" "umask 077 && mkdir -p -- $(quote "$remote_dir") && cat >$(quote "$remote_dir")/key" \
            <"$PROCPOOL_KEY_FILE"; then
            printf 'start-nodes: %s: cannot copy the key\n' "$host" >&2
            failed=$((failed + 1))
            continue
        fi
    fi
    if ! printf '%s' "$script" | run_ssh "$host" 'sh -s'; then
        printf 'start-nodes: %s: the node did not start\n' "$host" >&2
        failed=$((failed + 1))
    fi
done
[ "$failed" -eq 0 ] || die "$failed of ${#hosts[@]} hosts failed"
