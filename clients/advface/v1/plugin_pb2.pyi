from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FP32: _ClassVar[DataType]
    FP16: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
FP32: DataType
FP16: DataType

class ProtectorOptions(_message.Message):
    __slots__ = ("protector", "steps", "eps")
    PROTECTOR_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    protector: str
    steps: int
    eps: float
    def __init__(self, protector: _Optional[str] = ..., steps: _Optional[int] = ..., eps: _Optional[float] = ...) -> None: ...

class ProtectRequest(_message.Message):
    __slots__ = ("batch_id", "chunk_index", "chunk_count", "datatype", "shape", "options", "raw_data")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_DATA_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    chunk_index: int
    chunk_count: int
    datatype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    options: ProtectorOptions
    raw_data: bytes
    def __init__(self, batch_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., datatype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[ProtectorOptions, _Mapping]] = ..., raw_data: _Optional[bytes] = ...) -> None: ...

class FaceStats(_message.Message):
    __slots__ = ("shadow_loss_before", "shadow_loss_after", "perturbation_norm")
    SHADOW_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_NORM_FIELD_NUMBER: _ClassVar[int]
    shadow_loss_before: float
    shadow_loss_after: float
    perturbation_norm: float
    def __init__(self, shadow_loss_before: _Optional[float] = ..., shadow_loss_after: _Optional[float] = ..., perturbation_norm: _Optional[float] = ...) -> None: ...

class ProtectResponse(_message.Message):
    __slots__ = ("batch_id", "chunk_index", "chunk_count", "datatype", "shape", "face_stats", "model_version", "raw_data", "error")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FACE_STATS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RAW_DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    chunk_index: int
    chunk_count: int
    datatype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    face_stats: _containers.RepeatedCompositeFieldContainer[FaceStats]
    model_version: str
    raw_data: bytes
    error: _status_pb2.Status
    def __init__(self, batch_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., datatype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., face_stats: _Optional[_Iterable[_Union[FaceStats, _Mapping]]] = ..., model_version: _Optional[str] = ..., raw_data: _Optional[bytes] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Policy(_message.Message):
    __slots__ = ("protectors", "max_steps", "min_eps", "max_eps", "max_batch")
    PROTECTORS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_EPS_FIELD_NUMBER: _ClassVar[int]
    MAX_EPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    protectors: _containers.RepeatedScalarFieldContainer[str]
    max_steps: int
    min_eps: float
    max_eps: float
    max_batch: int
    def __init__(self, protectors: _Optional[_Iterable[str]] = ..., max_steps: _Optional[int] = ..., min_eps: _Optional[float] = ..., max_eps: _Optional[float] = ..., max_batch: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "content_hash", "feature_shape", "feature_dtype", "split", "shadow_arch", "protector", "protector_params", "device", "policy", "max_message_bytes", "max_unary_bytes")
    class ProtectorParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ARCH_FIELD_NUMBER: _ClassVar[int]
    PROTECTOR_FIELD_NUMBER: _ClassVar[int]
    PROTECTOR_PARAMS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UNARY_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    content_hash: str
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    feature_dtype: str
    split: str
    shadow_arch: str
    protector: str
    protector_params: _containers.ScalarMap[str, str]
    device: str
    policy: Policy
    max_message_bytes: int
    max_unary_bytes: int
    def __init__(self, model_version: _Optional[str] = ..., content_hash: _Optional[str] = ..., feature_shape: _Optional[_Iterable[int]] = ..., feature_dtype: _Optional[str] = ..., split: _Optional[str] = ..., shadow_arch: _Optional[str] = ..., protector: _Optional[str] = ..., protector_params: _Optional[_Mapping[str, str]] = ..., device: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., max_message_bytes: _Optional[int] = ..., max_unary_bytes: _Optional[int] = ...) -> None: ...
