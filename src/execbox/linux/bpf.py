"""A BPF_PROG_TYPE_CGROUP_DEVICE program built from device rules, loaded and attached with
the bpf() syscall through ctypes (no bcc, no clang)."""

from __future__ import annotations

import ctypes
import os
import struct

from .syscalls import _check, raw_syscall

BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_QUERY = 5, 8, 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_F_QUERY_EFFECTIVE = 1
DEV_BLOCK, DEV_CHAR = 1, 2
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def device_program(rules: list[tuple[str, int | None, int | None, str]]) -> bytes:
    """Allow (return 1) an access when a rule matches, else deny (return 0).

    Registers: r2 = device type, r3 = access bits, r4 = major, r5 = minor.
    """
    prog = [
        _insn(0x61, 2, 1, 0),        # r2 = ctx->access_type
        _insn(0x57, 2, imm=0xFFFF),  # r2 &= 0xffff (type)
        _insn(0x61, 3, 1, 0),        # r3 = ctx->access_type
        _insn(0x77, 3, imm=16),      # r3 >>= 16 (access)
        _insn(0x61, 4, 1, 4),        # r4 = ctx->major
        _insn(0x61, 5, 1, 8),        # r5 = ctx->minor
    ]
    for kind, major, minor, access in rules:
        block: list[tuple[int, int, int, int]] = []  # (code, dst, src, imm); off filled later
        if kind != "a":
            block.append((0x55, 2, 0, DEV_CHAR if kind == "c" else DEV_BLOCK))
        bits = (ACC_MKNOD if "m" in access else 0) | (ACC_READ if "r" in access else 0) | (
            ACC_WRITE if "w" in access else 0)
        if bits != 7:
            block.append((0xbf, 1, 3, 0))        # r1 = r3
            block.append((0x57, 1, 0, ~bits & 7))  # r1 &= accesses the rule lacks
            block.append((0x55, 1, 0, 0))        # any left: not this rule
        if major is not None:
            block.append((0x55, 4, 0, major))
        if minor is not None:
            block.append((0x55, 5, 0, minor))
        size = len(block) + 2  # + "r0 = 1; exit"
        for i, (code, dst, src, imm) in enumerate(block):
            off = size - i - 1 if code == 0x55 else 0
            prog.append(_insn(code, dst, src, off, imm))
        prog += [_insn(0xb7, 0, imm=1), _insn(0x95)]
    prog += [_insn(0xb7, 0, imm=0), _insn(0x95)]
    return b"".join(prog)


def _bpf(command: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    rc = raw_syscall("bpf", ctypes.c_int(command), attr, ctypes.c_uint(len(attr)))
    if rc < 0:
        _check(rc, f"bpf({command})")
    return rc


def load_device_program(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(65536)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()
        raise OSError(exc.errno, f"BPF program rejected: {detail[-1] if detail else exc}") from None


def attach(cgroup_dir: str, program_fd: int) -> None:
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, fd, program_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        _bpf(BPF_PROG_ATTACH, attr)
    finally:
        os.close(fd)


def attached_programs(cgroup_dir: str, effective: bool = False) -> list[int]:
    """Ids of the device programs attached to cgroup_dir itself, or (effective) of every
    one in force there, its ancestors' included."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(128)
        flags = BPF_F_QUERY_EFFECTIVE if effective else 0
        struct.pack_into("<IIIIQI", attr, 0, fd, BPF_CGROUP_DEVICE, flags, 0,
                         ctypes.addressof(ids), 64)
        _bpf(BPF_PROG_QUERY, attr)
        count = struct.unpack_from("<I", attr, 24)[0]
        return list(ids[:count])
    finally:
        os.close(fd)
