from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SetupFailure(_message.Message):
    __slots__ = ("step", "errno_name", "errno_number", "path", "message", "hint")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERRNO_NAME_FIELD_NUMBER: _ClassVar[int]
    ERRNO_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    step: str
    errno_name: str
    errno_number: int
    path: str
    message: str
    hint: str
    def __init__(self, step: _Optional[str] = ..., errno_name: _Optional[str] = ..., errno_number: _Optional[int] = ..., path: _Optional[str] = ..., message: _Optional[str] = ..., hint: _Optional[str] = ...) -> None: ...

class CgroupUsage(_message.Message):
    __slots__ = ("memory_peak_bytes", "cpu_usage_usec", "memory_limit_bytes", "oom_killed")
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_USEC_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    memory_peak_bytes: int
    cpu_usage_usec: int
    memory_limit_bytes: int
    oom_killed: bool
    def __init__(self, memory_peak_bytes: _Optional[int] = ..., cpu_usage_usec: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., oom_killed: _Optional[bool] = ...) -> None: ...
