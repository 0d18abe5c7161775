from node_agent.proto import node_agent_pb2 as _node_agent_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "address", "status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    status: _node_agent_pb2.NodeStatus
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[_node_agent_pb2.NodeStatus, _Mapping]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "sequence", "status")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    sequence: int
    status: _node_agent_pb2.NodeStatus
    def __init__(self, node_id: _Optional[str] = ..., sequence: _Optional[int] = ..., status: _Optional[_Union[_node_agent_pb2.NodeStatus, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("reregister",)
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    def __init__(self, reregister: _Optional[bool] = ...) -> None: ...

class PreemptingRequest(_message.Message):
    __slots__ = ("node_id", "preemption")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    preemption: _node_agent_pb2.Preemption
    def __init__(self, node_id: _Optional[str] = ..., preemption: _Optional[_Union[_node_agent_pb2.Preemption, _Mapping]] = ...) -> None: ...

class PreemptingReply(_message.Message):
    __slots__ = ("drain_by_unix", "requests_to_move")
    DRAIN_BY_UNIX_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TO_MOVE_FIELD_NUMBER: _ClassVar[int]
    drain_by_unix: float
    requests_to_move: int
    def __init__(self, drain_by_unix: _Optional[float] = ..., requests_to_move: _Optional[int] = ...) -> None: ...
