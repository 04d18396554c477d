#!/usr/bin/env bash
# Install, then show what `execbox run` does with a few typical build-step failures.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
EXECBOX=.venv/bin/execbox
demo_dir=$(mktemp -d)
trap 'rm -rf "$demo_dir"' EXIT

show() {
    echo
    echo "\$ execbox $*"
    "$EXECBOX" "$@"
    echo "-> exit status $?"
}

show run -- sh -c 'echo "hello from a build step"; exit 3'
show run --result "$demo_dir/result.json" -- /nonexistent/prog
echo "   result.json: $(tr -d '\n ' < "$demo_dir/result.json" | cut -c1-160)..."
printf '#!/usr/bin/python2.4\nprint "hi"\n' > "$demo_dir/old-script"
chmod +x "$demo_dir/old-script"
show run -- "$demo_dir/old-script"
echo
echo "A step that escapes with setsid and ignores SIGTERM, cancelled after 1 s:"
mark="demo-$$-$RANDOM"
show run --timeout 1 --grace 1 -- sh -c "setsid sh -c 'trap \"\" TERM; sleep 300 # $mark' & sleep 300 # $mark"
echo "   processes left behind: $(pgrep -fc "$mark" || true)"
show run --output-limit 64 --timestamps -- sh -c 'for i in 1 2 3 4 5; do echo "line $i"; done'

echo
echo "The same step in the default sandbox: its own root, pid 1, hostname and network, no privileges:"
show run --sandbox --hostname demo-box -- sh -c 'hostname; ps -e | wc -l; ls /; ip -brief link 2>/dev/null || ls /sys/class/net; id; cat /etc/shadow 2>&1 | head -1; touch /usr/x 2>&1'
show run --pty -- sh -c 'tty; stty size'
