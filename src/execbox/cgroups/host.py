"""Where the cgroup controllers are and which cgroup this process is in."""

from __future__ import annotations

import os

from ..linux.forksafe import Recent
from .delegation import base_of

ROOT = "/sys/fs/cgroup"


class CgroupHost:
    """mode is "v2", "v1" or "hybrid"; v1 maps controller -> its directory for us;
    unified is our cgroup2 directory (if any) and its available controllers."""

    def __init__(self, mode: str, v1: dict[str, str], unified: str | None,
                 unified_controllers: set[str]) -> None:
        self.mode = mode
        self.v1 = v1
        self.unified = unified
        self.unified_controllers = unified_controllers

    def directory_for(self, controller: str) -> tuple[str, str] | None:
        """("v1"|"v2", our directory) that provides controller, preferring cgroup2."""
        if self.unified is not None and controller in self.unified_controllers:
            return "v2", self.unified
        if controller in self.v1:
            return "v1", self.v1[controller]
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# Where the hierarchies are mounted, by the /proc/self/cgroup it was worked out for: a
# supervisor makes a cgroup per sandbox, and the mounts do not move (a process that moves
# to another cgroup reads another text). The controllers a cgroup2 parent offers are read
# each time: they change when the cgroup above enables or disables one.
_layouts = Recent(entries=8, biggest=1 << 16)


def detect(proc_cgroup: str = "/proc/self/cgroup", root: str = ROOT) -> CgroupHost:
    """Our cgroup directories (for the cgroup2 one: the delegated cgroup, not our leaf)."""
    text = _read(proc_cgroup)
    ours = proc_cgroup == "/proc/self/cgroup" and root == ROOT
    kept = _layouts.get(text) if ours else None
    layout = kept if isinstance(kept, tuple) else _layout(text, root)
    if ours and kept is None:
        _layouts.put(text, layout, len(text))
    mode, v1, unified = layout
    available: set[str] = set()
    if unified is not None:
        try:
            available = set(_read(f"{unified}/cgroup.controllers").split())
        except OSError:
            available = set()
    return CgroupHost(mode, dict(v1), unified, available)


def _layout(text: str, root: str) -> tuple[str, dict[str, str], str | None]:
    """(mode, v1 controller -> our directory, our cgroup2 directory) from our cgroup's
    line per hierarchy (/proc/self/cgroup's text) and the mounts below root."""
    own_v1: dict[str, str] = {}
    own_v2 = None
    for line in text.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            own_v2 = path
        else:
            for controller in controllers.split(","):
                own_v1[controller.removeprefix("name=")] = path
    unified_mount = None
    if os.path.exists(f"{root}/cgroup.controllers"):
        mode, unified_mount = "v2", root
    elif os.path.exists(f"{root}/unified/cgroup.controllers"):
        mode, unified_mount = "hybrid", f"{root}/unified"
    else:
        mode = "v1"
    v1 = {}
    if mode != "v2":
        for controller, path in own_v1.items():
            base = f"{root}/{controller}"
            if not os.path.isdir(base):
                # co-mounted controllers, e.g. cpu,cpuacct
                matches = [d for d in os.listdir(root) if controller in d.split(",")]
                if not matches:
                    continue
                base = f"{root}/{matches[0]}"
            v1[controller] = base + path.rstrip("/")
    unified = None
    if unified_mount is not None and own_v2 is not None:
        # Once moved into the leaf (see delegation.py), our cgroup is still its parent.
        unified = base_of(unified_mount + own_v2.rstrip("/"))
    return mode, v1, unified
