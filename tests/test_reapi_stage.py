"""Input roots staged from a real BuildGrid CAS through the local cache, output paths
prepared, and outputs collected back into the CAS."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("buildgrid.common")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from execbox.adapters.reapi.cache import LocalCas
from execbox.adapters.reapi.cas import CasClient
from execbox.adapters.reapi.digests import Digest, digest_key, digest_of_bytes
from execbox.adapters.reapi.outputs import (
    TREE_AND_DIRECTORY,
    OutputError,
    collect_outputs,
    upload_std_stream,
)
from execbox.adapters.reapi.protos import re_pb2
from execbox.adapters.reapi.stage import (
    InputError,
    materialize,
    plan_input_root,
    prepare_outputs,
    stage_input_root,
)
from test_reapi_cas import blob


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LocalCas]:
    with LocalCas(tmp_path / "cache", 1 << 30) as c:
        yield c


# A tree is described as a dict: name -> bytes (file), ("x", bytes) (executable file),
# ("l", target) (symlink) or dict (directory).
Spec = dict[str, object]


def build(spec: Spec, blobs: list[tuple[Digest, bytes]]) -> re_pb2.Directory:
    directory = re_pb2.Directory()
    for name in sorted(spec):
        entry = spec[name]
        if isinstance(entry, dict):
            sub = build(entry, blobs).SerializeToString()
            blobs.append((digest_of_bytes(sub), sub))
            directory.directories.add(name=name, digest=digest_of_bytes(sub))
        elif isinstance(entry, tuple) and entry[0] == "l":
            directory.symlinks.add(name=name, target=entry[1])
        else:
            executable = isinstance(entry, tuple)
            data = entry[1] if isinstance(entry, tuple) else entry
            assert isinstance(data, bytes)
            blobs.append((digest_of_bytes(data), data))
            directory.files.add(name=name, digest=digest_of_bytes(data), is_executable=executable)
    return directory


def upload_directory(client: CasClient, directory: re_pb2.Directory,
                     blobs: list[tuple[Digest, bytes]]) -> Digest:
    data = directory.SerializeToString()
    client.upload([*blobs, (digest_of_bytes(data), data)])
    return digest_of_bytes(data)


def upload_spec(client: CasClient, spec: Spec) -> Digest:
    blobs: list[tuple[Digest, bytes]] = []
    return upload_directory(client, build(spec, blobs), blobs)


def read_back(root: Path) -> Spec:
    """The spec a directory on disk matches."""
    out: Spec = {}
    for entry in os.scandir(root):
        if entry.is_symlink():
            out[entry.name] = ("l", os.readlink(entry.path))
        elif entry.is_dir():
            out[entry.name] = read_back(Path(entry.path))
        else:
            data = Path(entry.path).read_bytes()
            out[entry.name] = ("x", data) if os.access(entry.path, os.X_OK) and \
                entry.stat().st_mode & 0o100 else data
    return out


SPEC: Spec = {
    "main.c": b"int main() { return 0; }\n",
    "build.sh": ("x", b"#!/bin/sh\ncc main.c\n"),
    "empty": b"",
    "empty-x": ("x", b""),
    "link-to-main": ("l", "main.c"),
    "lib": {
        "a.h": b"#pragma once\n",
        "up": ("l", "../main.c"),
        "deep": {"deeper": {"x.txt": b"deep file", "same.txt": b"int main() { return 0; }\n"}},
        "emptydir": {},
    },
    "copy-of-lib-deep": {"deeper": {"x.txt": b"deep file",
                                    "same.txt": b"int main() { return 0; }\n"}},
}


# -- staging -----------------------------------------------------------------------------------

def test_a_tree_is_staged_with_hardlinks_from_the_cache(client: CasClient, cache: LocalCas,
                                                        tmp_path: Path) -> None:
    root = upload_spec(client, SPEC)
    dest = tmp_path / "action" / "root"
    stats = stage_input_root(cache, client, root, dest)
    assert read_back(dest) == SPEC
    assert (stats.files, stats.symlinks) == (9, 2)
    assert stats.directories == 7      # the root, lib, deep, deeper, emptydir, copy, deeper
    assert stats.cache_hits == 0 and stats.cache_misses == 6   # distinct (blob, x) pairs
    assert stats.bytes_fetched > 0
    main = dest / "main.c"
    assert main.stat().st_ino == cache.path_for(digest_of_bytes(SPEC["main.c"]),  # type: ignore[arg-type]
                                                False).stat().st_ino
    assert (dest / "lib/deep/deeper/same.txt").stat().st_ino == main.stat().st_ino
    for path in dest.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o222 == 0, f"{path} is writable ({mode:o})"
            assert mode in (0o444, 0o555)
            assert path.stat().st_nlink >= 2     # the cache holds the other link
    assert stat.S_IMODE((dest / "build.sh").stat().st_mode) == 0o555
    # staged again: everything comes from the cache
    again = stage_input_root(cache, client, root, tmp_path / "again")
    assert (again.cache_hits, again.cache_misses, again.bytes_fetched) == (6, 0, 0)
    assert read_back(tmp_path / "again") == SPEC


def test_an_existing_empty_destination_is_filled(client: CasClient, cache: LocalCas,
                                                 tmp_path: Path) -> None:
    root = upload_spec(client, {"f": b"x"})
    (tmp_path / "root").mkdir()
    stage_input_root(cache, client, root, tmp_path / "root")
    assert (tmp_path / "root/f").read_bytes() == b"x"


def bad_directory(**nodes: list[object]) -> re_pb2.Directory:
    return re_pb2.Directory(**nodes)  # type: ignore[arg-type]


FILE = digest_of_bytes(b"some file")


@pytest.mark.parametrize(("directory", "field"), [
    (re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=FILE)]), "files[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name="a/b", digest=FILE)]), "files[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name="", digest=FILE)]), "files[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name="a\0", digest=FILE)]), "files[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name=".", digest=FILE)]), "files[0].name"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="..", target="x")]),
     "symlinks[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name="a", digest=FILE)],
                      symlinks=[re_pb2.SymlinkNode(name="a", target="x")]),
     "symlinks[0].name"),
    (re_pb2.Directory(files=[re_pb2.FileNode(name="a", digest=FILE),
                             re_pb2.FileNode(name="a", digest=FILE)]), "files[1].name"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="")]),
     "symlinks[0].target"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="a\0b")]),
     "symlinks[0].target"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="/etc/passwd")]),
     "symlinks[0].target"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="../outside")]),
     "symlinks"),
    (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s", target="a/../../outside")]),
     "symlinks"),
    (re_pb2.Directory(files=[re_pb2.FileNode(
        name="f", digest=re_pb2.Digest(hash="../../etc/passwd", size_bytes=3))]),
     "files[0].digest.hash"),
])
def test_bad_trees_are_input_errors_naming_the_field(client: CasClient, cache: LocalCas,
                                                     tmp_path: Path,
                                                     directory: re_pb2.Directory,
                                                     field: str) -> None:
    client.upload([(FILE, b"some file")])
    root = upload_directory(client, directory, [])
    with pytest.raises(InputError) as caught:
        stage_input_root(cache, client, root, tmp_path / "root")
    assert caught.value.field == f"input_root {field}"
    assert not (tmp_path / "root").exists()     # nothing staged from a bad tree


def test_bad_names_deep_in_the_tree_name_their_directory(client: CasClient, cache: LocalCas,
                                                         tmp_path: Path) -> None:
    inner = re_pb2.Directory(files=[re_pb2.FileNode(name="..", digest=FILE)])
    blobs = [(FILE, b"some file")]
    inner_b = inner.SerializeToString()
    blobs.append((digest_of_bytes(inner_b), inner_b))
    mid = re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="b", digest=digest_of_bytes(inner_b))])
    mid_b = mid.SerializeToString()
    blobs.append((digest_of_bytes(mid_b), mid_b))
    top = re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="a", digest=digest_of_bytes(mid_b))])
    root = upload_directory(client, top, blobs)
    with pytest.raises(InputError) as caught:
        stage_input_root(cache, client, root, tmp_path / "root")
    assert caught.value.field == "input_root/a/b files[0].name"


def test_symlinks_may_climb_as_far_as_the_root_and_further_when_allowed(
        client: CasClient, cache: LocalCas, tmp_path: Path) -> None:
    spec: Spec = {"a": {"b": {"ok": ("l", "../../top"), "also": ("l", "./../x/../..")}},
                  "top": b"t"}
    stage_input_root(cache, client, upload_spec(client, spec), tmp_path / "one")
    assert (tmp_path / "one/a/b/ok").read_bytes() == b"t"
    escaping: Spec = {"abs": ("l", "/usr/bin/env"), "up": ("l", "../../x")}
    root = upload_spec(client, escaping)
    with pytest.raises(InputError):
        stage_input_root(cache, client, root, tmp_path / "two")
    stage_input_root(cache, client, root, tmp_path / "three", allow_escaping_symlinks=True)
    assert os.readlink(tmp_path / "three/abs") == "/usr/bin/env"


def test_a_tree_with_too_many_entries_is_refused(client: CasClient, cache: LocalCas,
                                                 tmp_path: Path) -> None:
    # 2**12 paths from 13 Directory messages: each level holds the next twice
    level = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=FILE)])
    blobs = [(FILE, b"some file")]
    for _ in range(12):
        data = level.SerializeToString()
        blobs.append((digest_of_bytes(data), data))
        level = re_pb2.Directory(directories=[
            re_pb2.DirectoryNode(name="a", digest=digest_of_bytes(data)),
            re_pb2.DirectoryNode(name="b", digest=digest_of_bytes(data))])
    root = upload_directory(client, level, blobs)
    with pytest.raises(InputError) as caught:
        stage_input_root(cache, client, root, tmp_path / "bomb", max_entries=5000)
    assert caught.value.field == "input_root_digest"


def _doubling_dag(levels: int) -> tuple[dict[str, re_pb2.Directory], Digest]:
    """A tree whose every level names the next one twice: 2**levels paths to one file."""
    level = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=FILE)])
    tree: dict[str, re_pb2.Directory] = {}
    for _ in range(levels):
        key = digest_of_bytes(level.SerializeToString())
        tree[digest_key(key)] = level
        level = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="a", digest=key),
                                              re_pb2.DirectoryNode(name="b", digest=key)])
    root = digest_of_bytes(level.SerializeToString())
    tree[digest_key(root)] = level
    return tree, root


def test_a_deep_directory_dag_is_refused_before_it_is_expanded(cache: LocalCas) -> None:
    # ~1 KB of Directory messages naming 2**25 paths: counted per distinct Directory
    tree, root = _doubling_dag(25)
    started = time.process_time()
    with pytest.raises(InputError) as caught:
        plan_input_root(tree, root, cache)
    assert caught.value.field == "input_root_digest"
    assert time.process_time() - started < 1.0
    # a shallower one within the bound is planned in full
    tree, root = _doubling_dag(8)
    assert plan_input_root(tree, root, cache, max_entries=2 ** 10).files == 2 ** 8
    with pytest.raises(InputError):
        plan_input_root(tree, root, cache, max_entries=2 ** 9)


def test_a_blob_evicted_by_another_process_before_linking_is_fetched_again(
        client: CasClient, cache: LocalCas, tmp_path: Path) -> None:
    spec: Spec = {"a": b"first", "b": ("x", b"second")}
    root = upload_spec(client, spec)
    tree = client.get_tree(root)
    plan = plan_input_root(tree, root, cache)
    with cache.lease([(d, x) for (_, x), d in plan.wanted.items()], client):
        for source in plan.sources:          # another process's eviction, in between
            os.unlink(source)
        materialize(plan, tmp_path / "root", cache, client)
    assert read_back(tmp_path / "root") == spec


def test_staging_a_thousand_files_is_as_fast_as_cp_al(client: CasClient, cache: LocalCas,
                                                      tmp_path: Path) -> None:
    spec: Spec = {f"d{i}": {f"f{j}": blob(f"perf-{i}-{j}", 64) for j in range(50)}
                  for i in range(20)}
    root = upload_spec(client, spec)
    stage_input_root(cache, client, root, tmp_path / "warm-up")
    best_stage = best_cp = float("inf")
    for attempt in range(3):
        stats = stage_input_root(cache, client, root, tmp_path / f"staged-{attempt}")
        assert stats.files == 1000 and stats.cache_misses == 0
        best_stage = min(best_stage, stats.link_seconds)
        started = time.monotonic()
        subprocess.run(["cp", "-al", str(tmp_path / "warm-up"), str(tmp_path / f"cp-{attempt}")],
                       check=True)
        best_cp = min(best_cp, time.monotonic() - started)
    assert read_back(tmp_path / "staged-0") == spec
    assert best_stage <= best_cp * 1.5 + 0.005, (best_stage, best_cp)


@given(st.recursive(
    st.binary(max_size=20) | st.tuples(st.just("x"), st.binary(max_size=20)),
    lambda children: st.dictionaries(st.text("abc.-_", min_size=1, max_size=4)
                                     .filter(lambda n: n not in (".", "..")),
                                     children, max_size=4),
    max_leaves=15).filter(lambda t: isinstance(t, dict)))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_tree_stages_to_what_it_describes(client: CasClient, cache: LocalCas,
                                              tmp_path: Path, spec: Spec) -> None:
    dest = tmp_path / f"h-{os.urandom(4).hex()}"
    stage_input_root(cache, client, upload_spec(client, spec), dest)
    assert read_back(dest) == spec
    shutil.rmtree(dest)


# -- output paths --------------------------------------------------------------------------

def test_prepare_outputs_creates_parents_only(tmp_path: Path) -> None:
    command = re_pb2.Command(output_files=["out/bin/tool"], output_directories=["gen/src"])
    assert prepare_outputs(command, tmp_path, "") == ["out/bin/tool", "gen/src"]
    assert (tmp_path / "out/bin").is_dir() and not (tmp_path / "out/bin/tool").exists()
    assert (tmp_path / "gen").is_dir() and not (tmp_path / "gen/src").exists()
    # output_paths supersede the old fields, relative to the working directory
    command = re_pb2.Command(output_paths=["a/b", "../up/c"], output_files=["ignored/x"])
    assert prepare_outputs(command, tmp_path, "work/dir") == ["work/dir/a/b", "work/up/c"]
    assert (tmp_path / "work/dir/a").is_dir() and (tmp_path / "work/up").is_dir()
    assert not (tmp_path / "ignored").exists()


@pytest.mark.parametrize(("command", "wd", "field"), [
    (re_pb2.Command(output_files=["/etc/passwd"]), "", "output_files[0]"),
    (re_pb2.Command(output_files=["ok", "../x"]), "", "output_files[1]"),
    (re_pb2.Command(output_directories=["a/../../x"]), "", "output_directories[0]"),
    (re_pb2.Command(output_paths=["../../x"]), "wd", "output_paths[0]"),
    (re_pb2.Command(output_paths=["a\0b"]), "", "output_paths[0]"),
    (re_pb2.Command(output_files=[""]), "", "output_files[0]"),
    (re_pb2.Command(output_files=["x"]), "/abs", "working_directory"),
    (re_pb2.Command(output_files=["x"]), "../up", "working_directory"),
])
def test_bad_output_paths_are_input_errors(tmp_path: Path, command: re_pb2.Command, wd: str,
                                           field: str) -> None:
    with pytest.raises(InputError) as caught:
        prepare_outputs(command, tmp_path, wd)
    assert caught.value.field == field


def test_the_working_directory_must_exist_unless_an_output_needs_it(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        prepare_outputs(re_pb2.Command(), tmp_path, "src/sub")
    assert caught.value.field == "working_directory"
    assert "'src'" in str(caught.value)
    assert not (tmp_path / "src").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as caught:
        prepare_outputs(re_pb2.Command(), tmp_path, "file")
    assert caught.value.field == "working_directory"
    (tmp_path / "there").mkdir()
    assert prepare_outputs(re_pb2.Command(), tmp_path, "there") == []


@pytest.mark.parametrize(("command", "field"), [
    (re_pb2.Command(output_files=["a"], output_directories=["a/"]), "output_directories[0]"),
    (re_pb2.Command(output_files=["a", "b/../a"]), "output_files[1]"),
    (re_pb2.Command(output_directories=["d", "./d"]), "output_directories[1]"),
    (re_pb2.Command(output_paths=["p", "p/"]), "output_paths[1]"),
])
def test_an_output_declared_twice_is_an_input_error(tmp_path: Path, command: re_pb2.Command,
                                                    field: str) -> None:
    with pytest.raises(InputError) as caught:
        prepare_outputs(command, tmp_path, "")
    assert caught.value.field == field
    assert "also declared as" in str(caught.value)


def test_output_parents_are_never_created_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(outside)
    with pytest.raises(InputError) as caught:
        prepare_outputs(re_pb2.Command(output_files=["out/sub/file"]), root, "")
    assert caught.value.field == "output_files[0]"
    assert list(outside.iterdir()) == []


# -- collecting outputs ----------------------------------------------------------------------

def tree_to_spec(client: CasClient, tree: re_pb2.Tree) -> Spec:
    """Rebuild a spec from a Tree: children looked up by digest, files read from the CAS."""
    children = {digest_key(digest_of_bytes(c.SerializeToString(deterministic=True))): c
                for c in tree.children}
    blobs: dict[str, bytes] = {}

    def walk(directory: re_pb2.Directory) -> Spec:
        out: Spec = {}
        wanted = [f.digest for f in directory.files]
        blobs.update(client.read_blobs(wanted))
        for f in directory.files:
            data = blobs[digest_key(f.digest)]
            out[f.name] = ("x", data) if f.is_executable else data
        for s in directory.symlinks:
            out[s.name] = ("l", s.target)
        for d in directory.directories:
            out[d.name] = walk(children[digest_key(d.digest)])
        return out

    return walk(tree.root)


def fetch_tree(client: CasClient, digest: Digest) -> re_pb2.Tree:
    return re_pb2.Tree.FromString(client.read_blobs([digest])[digest_key(digest)])


def make(root: Path, spec: Spec) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in spec.items():
        path = root / name
        if isinstance(entry, dict):
            make(path, entry)
        elif isinstance(entry, tuple) and entry[0] == "l":
            path.symlink_to(str(entry[1]))
        else:
            data = entry[1] if isinstance(entry, tuple) else entry
            assert isinstance(data, bytes)
            path.write_bytes(data)
            path.chmod(0o755 if isinstance(entry, tuple) else 0o644)


def test_outputs_round_trip(client: CasClient, tmp_path: Path) -> None:
    root = tmp_path / "root"
    out_dir: Spec = {"z.txt": b"zzz", "link": ("l", "z.txt"),
                     "nested": {"tool": ("x", b"#!/bin/sh\n"), "empty": b"", "e": {}},
                     "twin-1": {"same": b"same content"}, "twin-2": {"same": b"same content"}}
    make(root / "wd", {"out.bin": b"binary " + bytes(range(256)), "run.sh": ("x", b"echo\n"),
                       "dir": out_dir})
    command = re_pb2.Command(output_paths=["out.bin", "run.sh", "dir", "absent", "no/such"])
    result = re_pb2.ActionResult()
    collected = collect_outputs(command, root, "wd", client, result)
    files = {f.path: f for f in result.output_files}
    assert set(files) == {"out.bin", "run.sh"}
    assert not files["out.bin"].is_executable and files["run.sh"].is_executable
    assert files["out.bin"].digest == digest_of_bytes(b"binary " + bytes(range(256)))
    assert client.read_blobs([files["run.sh"].digest]) == {
        digest_key(files["run.sh"].digest): b"echo\n"}
    [directory] = result.output_directories
    assert directory.path == "dir"
    tree = fetch_tree(client, directory.tree_digest)
    assert tree_to_spec(client, tree) == out_dir
    # deduplicated: the twins share one child, and parents come before children
    keys = [digest_key(digest_of_bytes(c.SerializeToString(deterministic=True)))
            for c in tree.children]
    assert len(keys) == len(set(keys)) == 3          # nested, e and one twin
    position = {k: i for i, k in enumerate(keys)}
    for i, child in enumerate(tree.children):
        for sub in child.directories:
            assert position[digest_key(sub.digest)] > i
    assert tree.root.files[0].name == "z.txt" and tree.root.symlinks[0].name == "link"
    assert [d.name for d in tree.root.directories] == ["nested", "twin-1", "twin-2"]
    assert collected.stats.uploaded >= 1
    assert client.find_missing(f.digest for f in result.output_files) == []
    # a second collection finds everything already there
    assert collect_outputs(command, root, "wd", client).stats.uploaded == 0


def test_directories_are_uploaded_one_by_one_when_asked(client: CasClient,
                                                        tmp_path: Path) -> None:
    make(tmp_path / "r", {"d": {"sub": {"f": b"in sub " + os.urandom(4)}}})
    command = re_pb2.Command(output_directories=["d"])
    collected = collect_outputs(command, tmp_path / "r", "", client,
                                output_directory_format=TREE_AND_DIRECTORY)
    tree = fetch_tree(client, collected.directories[0].tree_digest)
    every = [tree.root, *tree.children]
    assert client.find_missing(digest_of_bytes(d.SerializeToString(deterministic=True))
                               for d in every) == []


def test_the_whole_working_directory_can_be_an_output(client: CasClient,
                                                      tmp_path: Path) -> None:
    make(tmp_path / "r", {"wd": {"a": b"a", "b": {"c": b"c"}}})
    collected = collect_outputs(re_pb2.Command(output_directories=[""]), tmp_path / "r", "wd",
                                client)
    [directory] = collected.directories
    assert directory.path == ""
    assert tree_to_spec(client, fetch_tree(client, directory.tree_digest)) == {
        "a": b"a", "b": {"c": b"c"}}


def test_a_symlink_escaping_the_root_is_reported_never_followed(client: CasClient,
                                                                tmp_path: Path) -> None:
    secret = b"secret outside the root " + os.urandom(8)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(secret)
    root = tmp_path / "root"
    make(root, {"d": {"inner": ("l", str(outside / "secret"))}})
    (root / "leak").symlink_to(outside / "secret")
    (root / "leakdir").symlink_to(outside)        # a parent of a declared output
    command = re_pb2.Command(output_paths=["leak", "leakdir/secret", "d", "leakdir"])
    result = re_pb2.ActionResult()
    collect_outputs(command, root, "", client, result)
    assert {(s.path, s.target) for s in result.output_symlinks} == {
        ("leak", str(outside / "secret")), ("leakdir", str(outside))}
    assert not result.output_files                     # leakdir/secret: absent
    tree = fetch_tree(client, result.output_directories[0].tree_digest)
    assert tree.root.symlinks[0].target == str(outside / "secret")
    assert client.find_missing([digest_of_bytes(secret)]) == [digest_of_bytes(secret)]


def test_old_fields_report_symlinks_in_their_own_lists(client: CasClient,
                                                       tmp_path: Path) -> None:
    make(tmp_path, {"target": b"t", "fl": ("l", "target"), "dl": ("l", "somedir"),
                    "somedir": {}})
    command = re_pb2.Command(output_files=["fl"], output_directories=["dl"])
    result = re_pb2.ActionResult()
    collect_outputs(command, tmp_path, "", client, result)
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("fl", "target")]
    assert [(s.path, s.target) for s in result.output_directory_symlinks] == [("dl", "somedir")]
    assert not result.output_symlinks and not result.output_files


def test_outputs_of_the_wrong_kind_are_output_errors(client: CasClient,
                                                     tmp_path: Path) -> None:
    make(tmp_path, {"adir": {}, "afile": b"f"})
    with pytest.raises(OutputError) as caught:
        collect_outputs(re_pb2.Command(output_files=["adir"]), tmp_path, "", client)
    assert caught.value.field == "output_files[0]"
    with pytest.raises(OutputError) as caught:
        collect_outputs(re_pb2.Command(output_directories=["afile"]), tmp_path, "", client)
    assert caught.value.field == "output_directories[0]"


def test_a_name_that_is_not_utf8_is_an_output_error(client: CasClient, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with open(os.path.join(os.fsencode(tmp_path / "d"), b"bad-\xff"), "wb") as f:
        f.write(b"x")
    with pytest.raises(OutputError) as caught:
        collect_outputs(re_pb2.Command(output_directories=["d"]), tmp_path, "", client)
    assert str(caught.value) == ("b'd/bad-\\xff': b'bad-\\xff' is not a UTF-8 name; REAPI "
                                 "cannot carry it")


def test_the_other_outputs_are_reported_beside_a_mismatched_one(client: CasClient,
                                                                tmp_path: Path) -> None:
    make(tmp_path, {"adir": {}, "afile": b"f", "d": {"x": b"x"}})
    result = re_pb2.ActionResult()
    command = re_pb2.Command(output_files=["adir", "afile"], output_directories=["d/"])
    with pytest.raises(OutputError) as caught:
        collect_outputs(command, tmp_path, "", client, result)
    assert caught.value.field == "output_files[0]"
    assert [f.path for f in result.output_files] == ["afile"]
    assert [d.path for d in result.output_directories] == ["d"]


def test_std_streams_are_uploaded_and_inlined_when_small(client: CasClient,
                                                         tmp_path: Path) -> None:
    small, large = b"hello\n" + os.urandom(8), blob("stdout-large", 100 * 1024)
    (tmp_path / "small").write_bytes(small)
    (tmp_path / "large").write_bytes(large)
    digest, raw = upload_std_stream(client, tmp_path / "small")
    assert (digest, raw) == (digest_of_bytes(small), small)
    digest, raw = upload_std_stream(client, tmp_path / "large")
    assert (digest, raw) == (digest_of_bytes(large), b"")
    assert client.read_blobs([digest])[digest_key(digest)] == large
    (tmp_path / "empty").write_bytes(b"")
    assert upload_std_stream(client, tmp_path / "empty") == (digest_of_bytes(b""), b"")
