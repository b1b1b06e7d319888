"""The records stages hand each other: one schema, one writer and one loader each.

    sync   -> third_party/llama.cpp/snapshot.json               (Snapshot: records/snapshot.py)
    build  -> build/reports/build-<backend>-<arch>.json         (BuildRecord: records/images.py)
    smoke  -> build/reports/smoke-<backend>-<arch>[-<tier>].json (SmokeRecord; JUnit beside it)
    publish-> build/reports/publish.json                         (PublishRecord: records/publish.py)

A record's dataclass is its schema (records/schema.py). A missing record is a
RecordMissingError, one that is not ours a RecordInvalidError, whichever stage reads it.
"""

from pipeline.records.images import (
    CPUS_TIER,
    MODEL_TIERS,
    NO_GPU_TIER,
    OUTPUTS,
    PUSHED_OUTPUTS,
    REAL_TIER,
    BuildRecord,
    CheckResult,
    Figure,
    Output,
    PlatformRecord,
    SmokeRecord,
    arch_of,
    find_build_record,
    load_build_records,
    load_smoke_records,
    require_build_records,
    write_record,
)
from pipeline.records.schema import SCHEMA

__all__ = [
    "CPUS_TIER",
    "MODEL_TIERS",
    "NO_GPU_TIER",
    "OUTPUTS",
    "PUSHED_OUTPUTS",
    "REAL_TIER",
    "SCHEMA",
    "BuildRecord",
    "CheckResult",
    "Figure",
    "Output",
    "PlatformRecord",
    "SmokeRecord",
    "arch_of",
    "find_build_record",
    "load_build_records",
    "load_smoke_records",
    "require_build_records",
    "write_record",
]
