"""A small REAPI client for the end-to-end tests, for what `bgd execute command` cannot do
(an Action.timeout, platform properties beside the defaults, reading stdout and stderr back,
cancelling an operation): the same protos and CAS calls, in this process."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from buildgrid.common.protos.google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from execbox.adapters.reapi import digests
from execbox.adapters.reapi.cas import CasClient
from execbox.adapters.reapi.protos import grpc, re_grpc, re_pb2


class Client:
    def __init__(self, remote: str, instance: str = "") -> None:
        target = remote.removeprefix("http://").removeprefix("grpc://")
        self.channel = grpc.insecure_channel(target)
        self.instance = instance
        self.cas = CasClient(self.channel, instance)
        self.execution = re_grpc.ExecutionStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)
        self.actions = re_grpc.ActionCacheStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # -- uploading ---------------------------------------------------------------------
    def upload_tree(self, root: Path) -> re_pb2.Digest:
        """Upload a local directory as an input root; its Directory digest."""
        blobs: list[tuple[re_pb2.Digest, bytes | Path]] = []

        def walk(directory: Path) -> re_pb2.Digest:
            message = re_pb2.Directory()
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                path = Path(entry.path)
                if entry.is_symlink():
                    message.symlinks.add(name=entry.name, target=os.readlink(path))
                elif entry.is_dir():
                    message.directories.add(name=entry.name, digest=walk(path))
                else:
                    digest = digests.digest_of_file(path)
                    blobs.append((digest, path))
                    executable = bool(entry.stat().st_mode & stat.S_IXUSR)
                    message.files.add(name=entry.name, digest=digest, is_executable=executable)
            data = message.SerializeToString()
            digest = digests.digest_of_bytes(data)
            blobs.append((digest, data))
            return digest

        digest = walk(root)
        self.cas.upload(blobs)
        return digest

    def action(self, argv: Sequence[str], input_root: Path, *, outputs: Sequence[str] = (),
               env: Mapping[str, str] | None = None, working_directory: str = "",
               platform: Mapping[str, str] | None = None, timeout: float | None = None,
               do_not_cache: bool = False, salt: bytes = b"") -> re_pb2.Digest:
        command = re_pb2.Command(arguments=list(argv), output_paths=sorted(outputs),
                                 working_directory=working_directory)
        for name, value in sorted((env or {"PATH": "/usr/bin:/bin"}).items()):
            command.environment_variables.add(name=name, value=value)
        platform_message = re_pb2.Platform()
        for name, value in sorted((platform or {}).items()):
            platform_message.properties.add(name=name, value=value)
        command.platform.CopyFrom(platform_message)
        command_data = command.SerializeToString()
        command_digest = digests.digest_of_bytes(command_data)
        action = re_pb2.Action(command_digest=command_digest,
                               input_root_digest=self.upload_tree(input_root),
                               do_not_cache=do_not_cache, salt=salt, platform=platform_message)
        if timeout is not None:
            action.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout),
                                                          nanos=int(timeout % 1 * 1e9)))
        action_data = action.SerializeToString()
        action_digest = digests.digest_of_bytes(action_data)
        self.cas.upload([(command_digest, command_data), (action_digest, action_data)])
        return action_digest

    # -- executing ---------------------------------------------------------------------
    def execute(self, action_digest: re_pb2.Digest, *, timeout: float = 120,
                skip_cache: bool = False) -> re_pb2.ExecuteResponse:
        """Execute and wait for the operation to finish."""
        for operation in self._stream(action_digest, timeout, skip_cache):
            if operation.done:
                response = re_pb2.ExecuteResponse()
                operation.response.Unpack(response)
                return response
        raise AssertionError("the Execute stream ended before the operation was done")

    def start(self, action_digest: re_pb2.Digest, *, timeout: float = 120) -> Execution:
        return Execution(self, action_digest, timeout)

    def _stream(self, action_digest: re_pb2.Digest, timeout: float,
                skip_cache: bool) -> Iterator[operations_pb2.Operation]:
        request = re_pb2.ExecuteRequest(instance_name=self.instance,
                                        action_digest=action_digest,
                                        skip_cache_lookup=skip_cache)
        return iter(self.execution.Execute(request, timeout=timeout))

    def cancel(self, operation_name: str) -> None:
        self.operations.CancelOperation(operations_pb2.CancelOperationRequest(
            name=operation_name), timeout=30)

    def read(self, digest: re_pb2.Digest) -> bytes:
        if digest.size_bytes == 0:
            return b""
        return self.cas.read_blobs([digest])[digests.digest_key(digest)]


class Execution:
    """An Execute call in a thread: its operation name, its stage, and its end."""

    def __init__(self, client: Client, action_digest: re_pb2.Digest, timeout: float) -> None:
        self.name = ""
        self.stages: list[int] = []
        self.response: re_pb2.ExecuteResponse | None = None
        self.error: Any = None
        self._named = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(client, action_digest, timeout))
        self._thread.start()

    def _run(self, client: Client, action_digest: re_pb2.Digest, timeout: float) -> None:
        try:
            for operation in client._stream(action_digest, timeout, True):
                self.name = operation.name
                metadata = re_pb2.ExecuteOperationMetadata()
                if operation.metadata.Unpack(metadata):
                    self.stages.append(metadata.stage)
                self._named.set()
                if operation.done:
                    response = re_pb2.ExecuteResponse()
                    if operation.response.Unpack(response):
                        self.response = response
                    else:
                        self.error = operation.error
                    return
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._named.set()

    def wait_named(self, timeout: float = 30) -> str:
        assert self._named.wait(timeout), "no operation name"
        return self.name

    def executing(self) -> bool:
        return re_pb2.ExecutionStage.EXECUTING in self.stages

    def join(self, timeout: float = 120) -> re_pb2.ExecuteResponse | None:
        self._thread.join(timeout)
        return self.response
