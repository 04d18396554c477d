"""Plans kept per request (plan/kept.py): used again only while building would give them."""

from __future__ import annotations

import marshal
import os
from pathlib import Path

import pytest

import execbox
from conftest import calls_to
from execbox.model import wire
from execbox.model.options import build_spec
from execbox.model.spec import CommandSpec
from execbox.plan import host, kept
from execbox.plan.build import Plan, build_plan


def _request(argv: list[str], **options: object) -> tuple[bytes, dict[str, object]]:
    spec = build_spec(argv, **options)  # type: ignore[arg-type]
    request = {"spec": spec.to_wire(), "fds": [[0, 0], [1, 1], [2, 2]]}
    return wire.encode(request)[4:], request


def _plan_from_scratch(data: bytes, io_fds: list[int]) -> tuple[object, object]:
    request = marshal.loads(data)
    spec = CommandSpec.from_wire(request["spec"])
    plan = build_plan(spec, [[io_fds[i], t] for i, t in request["fds"]])
    return plan.parent, plan.child


def _keep(data: bytes, request: dict[str, object], io_fds: list[int]) -> None:
    spec = CommandSpec.from_wire(request["spec"])  # type: ignore[arg-type]
    kept.plan_and_keep(data, request, spec,  # type: ignore[arg-type]
                       [[io_fds[i], t] for i, t in request["fds"]])  # type: ignore[attr-defined]


def _use(data: bytes, io_fds: list[int]) -> tuple[CommandSpec, list[list[int]], Plan] | None:
    """What the supervisor takes from a kept plan: (spec, fd map, plan), or None."""
    found = kept.kept_plan(data)
    if found is None:
        return None
    fd_map = [[io_fds[index], target] for index, target in found.request["fds"]]
    return found.spec, fd_map, found.plan(fd_map)


def _entry(data: bytes) -> kept.Kept:
    entry = kept._kept.get(data)
    assert isinstance(entry, kept.Kept)
    return entry


@pytest.fixture(autouse=True)
def _nothing_kept() -> None:
    kept._kept.clear()


@pytest.mark.parametrize("sandboxed", [False, True])
def test_a_kept_plan_is_the_one_building_gives_with_the_jobs_own_fds(
        tmp_path: Path, sandboxed: bool) -> None:
    options: dict[str, object] = {"cwd": str(tmp_path), "env": {"PATH": "/usr/bin:/bin"}}
    if sandboxed:
        options["sandbox"] = execbox.SandboxSpec(ro_binds=[("/etc", "/mnt")], tmpfs=["/scratch"])
    data, request = _request(["true"], **options)
    assert _use(data, [30, 31, 32]) is None  # nothing kept yet
    _keep(data, request, [30, 31, 32])
    again = _use(data, [40, 42, 41])
    assert again is not None
    spec, fd_map, plan = again
    assert fd_map == [[40, 0], [42, 1], [41, 2]]
    assert spec.to_wire() == request["spec"]
    assert (plan.parent, plan.child) == _plan_from_scratch(data, [40, 42, 41])
    # Each use gets its own copy: changing one plan changes no later one.
    plan.child.clear()
    third = _use(data, [40, 42, 41])
    assert third is not None and third[2].child == _plan_from_scratch(data, [40, 42, 41])[1]
    # Another request (one byte differs) has no plan kept.
    other, _ = _request(["false"], **options)
    assert _use(other, [30, 31, 32]) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="a root caller's sandbox idmaps the workdir "
                    "to its owner; only root can change that owner here")
def test_a_kept_plan_is_not_used_once_a_host_fact_it_read_has_changed(tmp_path: Path) -> None:
    """A root caller's sandbox maps the working directory's owner onto the step: a
    directory made again by someone else (a CI checkout) must get a plan of its own."""
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    os.chown(workdir, 1234, 1234)
    data, request = _request(["true"], cwd=str(workdir), env={"PATH": "/bin"},
                             sandbox=execbox.SandboxSpec())
    _keep(data, request, [0, 1, 2])
    assert ("owner", (str(workdir),), [1234, 1234]) in _entry(data).reads
    assert _use(data, [0, 1, 2]) is not None
    workdir.rmdir()
    workdir.mkdir()
    os.chown(workdir, 4321, 4321)
    assert _use(data, [0, 1, 2]) is None
    fresh = _plan_from_scratch(data, [0, 1, 2])
    assert ("prepare_idmaps", ([[4321, 4321]],)) in fresh[1]


def test_only_requests_whose_plan_is_a_function_of_their_bytes_are_kept(
        tmp_path: Path) -> None:
    # The supervisor's own environment (env=None on the wire) is not part of the bytes.
    spec = build_spec(["true"], cwd=str(tmp_path)).replace(env=None)
    request = {"spec": spec.to_wire(), "fds": [[0, 0], [1, 1], [2, 2]]}
    data = wire.encode(request)[4:]
    kept.plan_and_keep(data, request, spec, [[0, 0], [1, 1], [2, 2]])
    assert _use(data, [0, 1, 2]) is None
    # A plan kept by one process is not another's (its pid is in the plan's steps).
    data, request = _request(["true"], cwd=str(tmp_path), env={})
    _keep(data, request, [0, 1, 2])
    _entry(data).process = (os.getpid() + 1, os.geteuid(), os.getegid())
    assert _use(data, [0, 1, 2]) is None
    # Only the last KEEP plans are kept.
    for n in range(kept.KEEP + 1):
        data_n, request_n = _request(["true", str(n)], cwd=str(tmp_path), env={})
        _keep(data_n, request_n, [0, 1, 2])
    assert len(kept._kept) == kept.KEEP
    assert _use(_request(["true", "0"], cwd=str(tmp_path), env={})[0],
                          [0, 1, 2]) is None


def test_every_host_read_is_checked_again(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("somewhere")
    log = host.start_recording()
    try:
        assert host.islink(str(link)) and host.readlink(str(link)) == "somewhere"
        assert host.owner(str(tmp_path)) == [os.getuid(), os.getgid()]
        host.nofile()
        host.cwd()
    finally:
        host.stop_recording()
    assert [kind for kind, _, _ in log] == ["islink", "readlink", "owner", "nofile", "cwd"]
    assert host.still_true(log)
    link.unlink()
    link.symlink_to("elsewhere")
    assert not host.still_true(log)
    assert host.isdir(str(tmp_path)) and not host.still_true(log)  # (not recording now)


def test_a_copy_made_ahead_is_used_once_and_is_the_jobs_own(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """make_spare() decodes the last used kept plan's steps while the supervisor is idle; the
    next job takes that copy (no decoding on its launch), and the one after decodes its
    own again: no two jobs ever share a copy."""
    data, request = _request(["true"], cwd=str(tmp_path), env={"PATH": "/bin"})
    _keep(data, request, [30, 31, 32])
    first = _use(data, [40, 41, 42])
    assert first is not None
    kept.make_spare()  # (for the kept plan just used)
    decoded = calls_to(monkeypatch, kept.marshal, "loads")
    second = _use(data, [50, 51, 52])
    assert second is not None and decoded == []  # the spare, decoded ahead
    third = _use(data, [60, 61, 62])
    assert third is not None and len(decoded) == 1  # no spare left: decoded for it
    assert second[2].child is not third[2].child and second[2].parent is not third[2].parent
    second[2].child.clear()
    assert third[2].child == _plan_from_scratch(data, [60, 61, 62])[1]
    # A forked child keeps nothing of it.
    pid = os.fork()
    if pid == 0:
        os._exit(0 if not kept._used else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_what_is_derived_from_a_kept_plan_is_worked_out_once(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A kept plan's copies share Plan.memo: the split of a sandbox plan into what a ready
    pid 1 does ahead and the rest, and its profile, are worked out for the first copy; each
    later copy's rest has its own dup2 step. A plan of its own has no memo."""
    from execbox.spawn import ready

    box = execbox.SandboxSpec(ro_binds=[("/etc", "/mnt")])
    data, request = _request(["true"], cwd=str(tmp_path), env={"PATH": "/bin"}, sandbox=box)
    _keep(data, request, [30, 31, 32])
    uses = [_use(data, [40 + i, 50 + i, 60 + i]) for i in range(3)]
    plans = [use[2] for use in uses if use is not None]
    assert len(plans) == 3 and plans[0].memo is plans[1].memo is not None
    real_split = ready.split
    splits = calls_to(monkeypatch, ready, "split")
    for plan in plans:
        parts = ready.split_plan(plan)
        assert parts == real_split(plan.child), plan.child
        assert parts is not None and ("dup2", (plan.child[[n for n, _ in plan.child]
                                                          .index("dup2")][1][0],)) in parts[1]
    assert len(splits) == 1  # the first copy's; the others took it from the memo
    profile = ready.profile_of(plans[0])
    assert profile is not None and ready.profile_of(plans[2]) is profile
    own = build_plan(CommandSpec.from_wire(request["spec"]),  # type: ignore[arg-type]
                     [[1, 1], [2, 2]])
    assert own.memo is None and ready.split_plan(own) is not None
    assert len(splits) == 2  # (worked out for it alone)
