"""The per-architecture syscall and ioctl table, checked against the kernel's own headers.

A wrong number here runs a different syscall, so every entry is compared with the uapi
headers of Debian's linux-libc-dev. A missing header skips the comparison, except under
CI=true as root, where scripts/test.sh installs the package and a skip would hide a gap.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from execbox.linux import arch

INCLUDE = Path("/usr/include")
SRC = Path(__file__).resolve().parent.parent / "src" / "execbox"
NATIVE_TRIPLET = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
# Where each architecture's syscall numbers are defined. aarch64 uses the asm-generic
# numbering, which linux-libc-dev ships on every host; x86_64's own header only on x86_64
# (or with linux-libc-dev-amd64-cross).
SYSCALL_HEADERS = {
    "x86_64": ("x86_64-linux-gnu/asm/unistd_64.h", "/usr/x86_64-linux-gnu/include/asm/unistd_64.h"),
    "aarch64": ("asm-generic/unistd.h",),
}
# Both take their tty ioctls from asm-generic; linux/sockios.h is the same everywhere.
IOCTL_HEADERS = ("asm-generic/ioctls.h", "linux/sockios.h")
C_SIZES = {"int": 4, "unsigned int": 4}  # sizeof on both architectures


def _strict() -> bool:
    """Under CI as root the headers were installed, so a missing one is a failure."""
    return os.environ.get("CI") == "true" and os.geteuid() == 0


def _header(*candidates: str, native: bool = True) -> Path:
    """The first existing candidate; skip (or fail, see _strict) when there is none.
    native=False: a header this host's linux-libc-dev does not ship, so never required."""
    paths = [INCLUDE / c for c in candidates]  # an absolute candidate replaces INCLUDE
    for path in paths:
        if path.is_file():
            return path
    reason = f"kernel header missing: {', '.join(map(str, paths))} (install linux-libc-dev)"
    if native and _strict():
        pytest.fail(reason)
    pytest.skip(reason)


def _defines(text: str) -> dict[str, list[str]]:
    """Every `#define NAME VALUE` (comments dropped); a name defined in several #if branches
    keeps all its values."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    found: dict[str, list[str]] = {}
    for match in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.+?)[ \t]*$", text, re.M):
        found.setdefault(match[1], []).append(match[2])
    return found


def _resolve(defines: dict[str, list[str]], name: str, depth: int = 0) -> int:
    """A define's integer value, following aliases such as __NR_fcntl -> __NR3264_fcntl."""
    values = {v.strip("() ") for v in defines.get(name, [])}
    assert len(values) == 1, f"{name}: defined {len(values)} ways: {sorted(values)}"
    value = values.pop()
    number = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)[uUlL]*", value)
    if number:
        return int(number[1], 0)
    assert depth < 8 and re.fullmatch(r"\w+", value), f"{name}: cannot evaluate {value!r}"
    return _resolve(defines, value, depth + 1)


def _ioctl(defines: dict[str, list[str]], encoding: dict[str, list[str]], name: str) -> int:
    """Evaluate a request number, including _IO/_IOR/_IOW/_IOWR with the given encoding."""
    values = defines.get(name, [])
    assert len(values) == 1, f"{name}: defined {len(values)} times"
    call = re.fullmatch(r"_IO(R|W|WR)?\(\s*'(.)'\s*,\s*(\w+)\s*(?:,\s*([\w ]+?)\s*)?\)",
                        values[0])
    if call is None:
        return _resolve(defines, name)
    kind, type_char, nr, ctype = call.groups()

    def enc(field: str) -> int:
        return _resolve(encoding, field)

    direction = {None: enc("_IOC_NONE"), "R": enc("_IOC_READ"), "W": enc("_IOC_WRITE"),
                 "WR": enc("_IOC_READ") | enc("_IOC_WRITE")}[kind]
    size = C_SIZES[ctype] if ctype else 0
    type_shift = enc("_IOC_NRBITS")
    size_shift = type_shift + enc("_IOC_TYPEBITS")
    dir_shift = size_shift + enc("_IOC_SIZEBITS")
    return ((direction << dir_shift) | (size << size_shift) | (ord(type_char) << type_shift)
            | int(nr, 0))


def test_header_parser_follows_3264_aliases_and_ioctl_macros() -> None:
    defines = _defines("#define __NR3264_fcntl 25\n#if __BITS_PER_LONG == 64\n"
                       "#define __NR_fcntl __NR3264_fcntl\n#else\n"
                       "#define __NR_fcntl64 __NR3264_fcntl\n#endif\n"
                       "#define __NR_pivot_root 41 /* old */\n"
                       "#define TIOCSPTLCK\t_IOW('T', 0x31, int)  /* Lock/unlock Pty */\n")
    assert _resolve(defines, "__NR_fcntl") == _resolve(defines, "__NR_fcntl64") == 25
    assert _resolve(defines, "__NR_pivot_root") == 41
    encoding = _defines("#define _IOC_NRBITS 8\n#define _IOC_TYPEBITS 8\n"
                        "# define _IOC_SIZEBITS 14\n# define _IOC_NONE 0U\n"
                        "# define _IOC_WRITE 1U\n# define _IOC_READ 2U\n")
    assert _ioctl(defines, encoding, "TIOCSPTLCK") == 0x40045431


@pytest.mark.parametrize("machine", arch.KNOWN)
def test_syscall_numbers_match_the_kernel_headers(machine: str) -> None:
    native = machine == arch.current() or SYSCALL_HEADERS[machine][0].startswith("asm-generic")
    header = _header(*SYSCALL_HEADERS[machine], native=native)
    defines = _defines(header.read_text())
    wrong = {name: (number, _resolve(defines, f"__NR_{name}"))
             for name, number in arch.SYSCALLS[machine].items()
             if _resolve(defines, f"__NR_{name}") != number}
    assert not wrong, f"{machine} (table, {header}): {wrong}"


@pytest.mark.parametrize("machine", arch.KNOWN)
def test_ioctl_numbers_match_the_kernel_headers(machine: str) -> None:
    defines: dict[str, list[str]] = {}
    for name in IOCTL_HEADERS:
        defines.update(_defines(_header(name).read_text()))
    encoding = _defines(_header("asm-generic/ioctl.h").read_text())
    wrong = {name: (hex(number), hex(_ioctl(defines, encoding, name)))
             for name, number in arch.IOCTLS[machine].items()
             if _ioctl(defines, encoding, name) != number}
    assert not wrong, f"{machine} (table, headers): {wrong}"
    # The asm-generic values hold only while the architecture's own header just includes them.
    own = INCLUDE / NATIVE_TRIPLET[machine] / "asm" / "ioctls.h"
    if own.is_file():
        assert re.search(r"#include\s*<asm-generic/ioctls.h>", own.read_text())
        assert not any(n in _defines(own.read_text()) for n in arch.IOCTLS[machine])


def test_numbers_agree_with_python_and_this_kernel() -> None:
    if not arch.is_known():
        pytest.skip(f"no table for {arch.current()}")
    for name, number in arch.IOCTLS[arch.current()].items():
        if hasattr(termios, name):  # newer Pythons export some of them
            assert getattr(termios, name) == number, name
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        reply = fcntl.ioctl(sock.fileno(), arch.ioctl_number("SIOCGIFFLAGS"), request)
    assert struct.unpack("16sH22x", reply)[1] & 0x8  # IFF_LOOPBACK
    master, slave = os.openpty()
    try:
        peer = fcntl.ioctl(master, arch.ioctl_number("TIOCGPTPEER"), os.O_RDWR | os.O_NOCTTY)
        assert os.ttyname(peer) == os.ttyname(slave)
        os.close(peer)
    finally:
        os.close(master)
        os.close(slave)


def test_the_table_names_exactly_the_raw_calls_in_src() -> None:
    sources = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    syscalls = set(re.findall(r"raw_syscall\(\s*\"(\w+)\"", sources))
    ioctls = set(re.findall(r"ioctl_number\(\s*\"(\w+)\"", sources))
    for machine in arch.KNOWN:
        assert set(arch.SYSCALLS[machine]) == syscalls, machine
        assert set(arch.IOCTLS[machine]) == ioctls, machine
    # Raw numbers outside the table: syscall(<number>) or ioctl(fd, <number literal>).
    assert not re.search(r"\.syscall\(\s*(ctypes\.c_long\()?\s*\d", sources)
    assert not re.search(r"ioctl\([^,()]+,\s*\d", sources)
    assert sources.count("_lib().syscall(") == 1  # only raw_syscall


def test_names_and_aliases() -> None:
    assert set(arch.SYSCALLS) == set(arch.IOCTLS) == set(arch.KNOWN)
    assert arch.normalize("amd64") == arch.normalize("x86_64") == "x86_64"
    assert arch.normalize("arm64") == arch.normalize("aarch64") == "aarch64"
    assert arch.is_known("amd64") and arch.is_known("arm64")
    assert not arch.is_known("riscv64") and not arch.is_known("ppc64le")
    assert arch.syscall_number("pivot_root", "amd64") == 155
    assert arch.syscall_number("pivot_root", "arm64") == 41
    # Syscalls from 424 on share their number; the older ones do not.
    x86, arm = arch.SYSCALLS["x86_64"], arch.SYSCALLS["aarch64"]
    assert all((x86[n] == arm[n]) == (x86[n] >= 424) for n in x86)


def test_unknown_architecture_is_a_clear_enosys_error() -> None:
    with pytest.raises(arch.UnsupportedArchitecture) as info:
        arch.syscall_number("pivot_root", "riscv64")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSYS
    assert info.value.machine == "riscv64"
    assert info.value.strerror == ("execbox has no syscall table for architecture 'riscv64' "
                                   "(known: x86_64, aarch64)")
    with pytest.raises(arch.UnsupportedArchitecture):
        arch.ioctl_number("TIOCGPTPEER", "mips64")


def test_an_unknown_machine_imports_runs_plain_steps_and_fails_doctor(tmp_path: Path) -> None:
    # Every Python process started with this PYTHONPATH (the fork server too) sees riscv64.
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n_real = os.uname\n"
        "os.uname = lambda: os.uname_result(tuple(_real())[:4] + ('riscv64',))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=env, timeout=60, check=False)

    probe = python("-c", "import execbox, execbox.linux.syscalls as sc\n"
                   "try:\n    sc.pivot_root('/', '/')\nexcept OSError as e:\n    print(e)")
    assert probe.returncode == 0, probe.stderr
    assert "no syscall table for architecture 'riscv64'" in probe.stdout
    run = python("-m", "execbox", "run", "--", "sh", "-c", "echo plain")
    assert run.returncode == 0 and "plain" in run.stdout, run.stderr
    doctor = python("-m", "execbox", "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 2
    assert checks["architecture"]["status"] == "fail"
    assert "riscv64" in checks["architecture"]["finding"]


def test_the_native_pid_1s_syscall_numbers_match_the_kernel_headers() -> None:
    """linux/native_init.py's machine code makes its syscalls by number: each
    `mov $N, %eax` right before a `syscall` is checked, in order, against the headers."""
    from execbox.linux.native_init import _CODE

    header = _header(*SYSCALL_HEADERS["x86_64"], native=arch.current() == "x86_64")
    defines = _defines(header.read_text())
    code = _CODE["x86_64"]
    found = [int.from_bytes(code[i + 1:i + 5], "little") for i in range(len(code) - 6)
             if code[i] == 0xB8 and code[i + 5:i + 7] == b"\x0f\x05"]
    calls = ["rt_sigprocmask", "rt_sigaction", "rt_sigprocmask", "prctl", "prctl", "poll",
             "close_range", "wait4",
             "rt_sigtimedwait", "exit"]
    assert found == [_resolve(defines, f"__NR_{name}") for name in calls]
    assert set(_CODE) <= set(arch.KNOWN)
