#!/bin/sh
# Rebuild the step launcher (src/execbox/linux/launcher.c) and write its bytes into
# src/execbox/linux/launcher_code.py. Needs gcc for x86-64; the result is checked in, so
# installing execbox needs no compiler. tests/test_launcher.py checks that it is current.
set -eu
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
gcc -Os -static -nostdlib -ffreestanding -fno-builtin -fno-stack-protector -fno-pie -no-pie \
    -fno-asynchronous-unwind-tables -fno-ident -Wall -Wextra -Werror \
    -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-z,norelro -Wl,-z,noseparate-code -s \
    -o "$out/launcher" src/execbox/linux/launcher.c
python3 - "$out/launcher" "$(gcc --version | head -n 1)" <<'PY'
import sys, textwrap
code = open(sys.argv[1], "rb").read().hex()
lines = "\n".join(f'        "{chunk}"' for chunk in textwrap.wrap(code, 80))
open("src/execbox/linux/launcher_code.py", "w").write(
    '"""The step launcher (linux/launcher.c) as built by scripts/build-launcher.sh."""\n\n'
    f"COMPILER = {sys.argv[2]!r}\n"
    'CODE = {\n    "x86_64": bytes.fromhex(\n' + lines + "),\n}\n")
PY
