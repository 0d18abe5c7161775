from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
    FINISH_REASON_HANDED_OVER: _ClassVar[FinishReason]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_LOADING: _ClassVar[InstanceState]
    INSTANCE_STATE_READY: _ClassVar[InstanceState]
    INSTANCE_STATE_STOPPING: _ClassVar[InstanceState]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason
FINISH_REASON_HANDED_OVER: FinishReason
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_LOADING: InstanceState
INSTANCE_STATE_READY: InstanceState
INSTANCE_STATE_STOPPING: InstanceState

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "logprobs", "prompt_logprobs", "response_format")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    min_tokens: int
    logprobs: int
    prompt_logprobs: int
    response_format: str
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., min_tokens: _Optional[int] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ..., response_format: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("instance_id", "request_id", "prompt_ids", "params", "output_ids", "prefix_from")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FROM_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    prefix_from: str
    def __init__(self, instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., output_ids: _Optional[_Iterable[int]] = ..., prefix_from: _Optional[str] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("has_token", "token_id", "text", "finish_reason", "error", "logprobs", "prompt_logprobs")
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    has_token: bool
    token_id: int
    text: str
    finish_reason: FinishReason
    error: str
    logprobs: TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    def __init__(self, has_token: _Optional[bool] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., error: _Optional[str] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class MigrateFeed(_message.Message):
    __slots__ = ("begin", "catch_up", "commit")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    begin: GenerateRequest
    catch_up: TokenIds
    commit: TokenIds
    def __init__(self, begin: _Optional[_Union[GenerateRequest, _Mapping]] = ..., catch_up: _Optional[_Union[TokenIds, _Mapping]] = ..., commit: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class MigrateEvent(_message.Message):
    __slots__ = ("prefilled", "token")
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefilled: int
    token: TokenEvent
    def __init__(self, prefilled: _Optional[int] = ..., token: _Optional[_Union[TokenEvent, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("instance_id", "request_id", "after_outputs")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request_id: str
    after_outputs: int
    def __init__(self, instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., after_outputs: _Optional[int] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineOptions(_message.Message):
    __slots__ = ("kv_cache_bytes", "max_batch_size", "max_model_len")
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    kv_cache_bytes: int
    max_batch_size: int
    max_model_len: int
    def __init__(self, kv_cache_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class LoadTimings(_message.Message):
    __slots__ = ("queue_s", "fetch_s", "read_build_s", "total_s", "streamed_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    READ_BUILD_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    STREAMED_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    fetch_s: float
    read_build_s: float
    total_s: float
    streamed_s: float
    def __init__(self, queue_s: _Optional[float] = ..., fetch_s: _Optional[float] = ..., read_build_s: _Optional[float] = ..., total_s: _Optional[float] = ..., streamed_s: _Optional[float] = ...) -> None: ...

class LoadInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "source", "tier", "engine")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    source: str
    tier: str
    engine: EngineOptions
    def __init__(self, instance_id: _Optional[str] = ..., source: _Optional[str] = ..., tier: _Optional[str] = ..., engine: _Optional[_Union[EngineOptions, _Mapping]] = ...) -> None: ...

class LoadInstanceReply(_message.Message):
    __slots__ = ("instance_id", "checkpoint_key", "weight_bytes", "reserved_bytes", "pid", "timings", "loaded_from")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    checkpoint_key: str
    weight_bytes: int
    reserved_bytes: int
    pid: int
    timings: LoadTimings
    loaded_from: str
    def __init__(self, instance_id: _Optional[str] = ..., checkpoint_key: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., pid: _Optional[int] = ..., timings: _Optional[_Union[LoadTimings, _Mapping]] = ..., loaded_from: _Optional[str] = ...) -> None: ...

class UnloadInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class UnloadInstanceReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("source", "tier")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    source: str
    tier: str
    def __init__(self, source: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class PrefetchReply(_message.Message):
    __slots__ = ("checkpoint_key", "path", "bytes", "seconds")
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_key: str
    path: str
    bytes: int
    seconds: float
    def __init__(self, checkpoint_key: _Optional[str] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("checkpoint_key", "tier")
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    checkpoint_key: str
    tier: str
    def __init__(self, checkpoint_key: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UndrainReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Holding(_message.Message):
    __slots__ = ("key", "source", "bytes", "pinned", "sources")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    key: str
    source: str
    bytes: int
    pinned: bool
    sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., source: _Optional[str] = ..., bytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., sources: _Optional[_Iterable[str]] = ...) -> None: ...

class TierHoldings(_message.Message):
    __slots__ = ("tier", "budget_bytes", "holdings", "arena")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOLDINGS_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    tier: str
    budget_bytes: int
    holdings: _containers.RepeatedCompositeFieldContainer[Holding]
    arena: Arena
    def __init__(self, tier: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., holdings: _Optional[_Iterable[_Union[Holding, _Mapping]]] = ..., arena: _Optional[_Union[Arena, _Mapping]] = ...) -> None: ...

class Arena(_message.Message):
    __slots__ = ("path", "size_bytes", "free_bytes", "largest_free_bytes", "startup_s")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STARTUP_S_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    free_bytes: int
    largest_free_bytes: int
    startup_s: float
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., largest_free_bytes: _Optional[int] = ..., startup_s: _Optional[float] = ...) -> None: ...

class Bandwidth(_message.Message):
    __slots__ = ("tier", "bytes_per_s")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    tier: str
    bytes_per_s: float
    def __init__(self, tier: _Optional[str] = ..., bytes_per_s: _Optional[float] = ...) -> None: ...

class GpuDevice(_message.Message):
    __slots__ = ("index", "name", "total_bytes", "free_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class CpuBudget(_message.Message):
    __slots__ = ("memory_budget_bytes", "memory_reserved_bytes", "slots_total", "slots_used")
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    memory_budget_bytes: int
    memory_reserved_bytes: int
    slots_total: int
    slots_used: int
    def __init__(self, memory_budget_bytes: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ..., slots_total: _Optional[int] = ..., slots_used: _Optional[int] = ...) -> None: ...

class Devices(_message.Message):
    __slots__ = ("gpus", "cpu")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuDevice]
    cpu: CpuBudget
    def __init__(self, gpus: _Optional[_Iterable[_Union[GpuDevice, _Mapping]]] = ..., cpu: _Optional[_Union[CpuBudget, _Mapping]] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "source", "checkpoint_key", "state", "pid", "running_requests", "reserved_bytes", "timings", "loaded_from")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    source: str
    checkpoint_key: str
    state: InstanceState
    pid: int
    running_requests: int
    reserved_bytes: int
    timings: LoadTimings
    loaded_from: str
    def __init__(self, instance_id: _Optional[str] = ..., source: _Optional[str] = ..., checkpoint_key: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., pid: _Optional[int] = ..., running_requests: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., timings: _Optional[_Union[LoadTimings, _Mapping]] = ..., loaded_from: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "devices", "tiers", "bandwidths", "instances", "draining", "idle_workers", "preemption")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTHS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IDLE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    devices: Devices
    tiers: _containers.RepeatedCompositeFieldContainer[TierHoldings]
    bandwidths: _containers.RepeatedCompositeFieldContainer[Bandwidth]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    draining: bool
    idle_workers: int
    preemption: Preemption
    def __init__(self, node_id: _Optional[str] = ..., devices: _Optional[_Union[Devices, _Mapping]] = ..., tiers: _Optional[_Iterable[_Union[TierHoldings, _Mapping]]] = ..., bandwidths: _Optional[_Iterable[_Union[Bandwidth, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ..., draining: _Optional[bool] = ..., idle_workers: _Optional[int] = ..., preemption: _Optional[_Union[Preemption, _Mapping]] = ...) -> None: ...

class Preemption(_message.Message):
    __slots__ = ("source", "kind", "deadline_unix", "detail", "noticed_unix", "drained")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    NOTICED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    source: str
    kind: str
    deadline_unix: float
    detail: str
    noticed_unix: float
    drained: bool
    def __init__(self, source: _Optional[str] = ..., kind: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., detail: _Optional[str] = ..., noticed_unix: _Optional[float] = ..., drained: _Optional[bool] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("path", "engine", "manifest", "committed_path")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    engine: EngineOptions
    manifest: bytes
    committed_path: str
    def __init__(self, path: _Optional[str] = ..., engine: _Optional[_Union[EngineOptions, _Mapping]] = ..., manifest: _Optional[bytes] = ..., committed_path: _Optional[str] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("read_build_s",)
    READ_BUILD_S_FIELD_NUMBER: _ClassVar[int]
    read_build_s: float
    def __init__(self, read_build_s: _Optional[float] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("partition", "start", "end")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    partition: int
    start: int
    end: int
    def __init__(self, partition: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class LoadFeed(_message.Message):
    __slots__ = ("start", "landed", "complete", "failed")
    START_FIELD_NUMBER: _ClassVar[int]
    LANDED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    start: LoadRequest
    landed: ByteRanges
    complete: bool
    failed: str
    def __init__(self, start: _Optional[_Union[LoadRequest, _Mapping]] = ..., landed: _Optional[_Union[ByteRanges, _Mapping]] = ..., complete: _Optional[bool] = ..., failed: _Optional[str] = ...) -> None: ...

class ByteRanges(_message.Message):
    __slots__ = ("ranges",)
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    def __init__(self, ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ...) -> None: ...

class LoadStatus(_message.Message):
    __slots__ = ("serving", "complete", "read_build_s", "directory_device", "directory_inode")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    READ_BUILD_S_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_INODE_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    complete: bool
    read_build_s: float
    directory_device: int
    directory_inode: int
    def __init__(self, serving: _Optional[bool] = ..., complete: _Optional[bool] = ..., read_build_s: _Optional[float] = ..., directory_device: _Optional[int] = ..., directory_inode: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("loaded", "running_requests", "pid")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    running_requests: int
    pid: int
    def __init__(self, loaded: _Optional[bool] = ..., running_requests: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...
