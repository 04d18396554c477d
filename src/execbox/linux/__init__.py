"""Bindings for Linux syscalls the standard library lacks (ctypes lives only here)."""
