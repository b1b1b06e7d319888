"""The backend x platform matrix (matrix.yaml) as typed data: what is built for which platform
and how (backends.py), read and checked key by key (load.py); the names a command line gives
resolved to it (choose.py), the backend this host's GPU calls for (hostgpu.py), and the
Dockerfiles rendered from it (dockerfile.py)."""

from pipeline.matrix.backends import (
    Backend,
    BackendSmoke,
    BuildTarget,
    CpuVariantSet,
    CudaRuntime,
    Matrix,
    Runtime,
    RuntimeUser,
    SmokeTier,
    TargetPlatform,
    configure_flags,
    host_platform,
    normalize_platform,
)
from pipeline.matrix.load import MATRIX_FILE, load_matrix, parse_matrix

__all__ = [
    "MATRIX_FILE",
    "Backend",
    "BackendSmoke",
    "BuildTarget",
    "CpuVariantSet",
    "CudaRuntime",
    "Matrix",
    "Runtime",
    "RuntimeUser",
    "SmokeTier",
    "TargetPlatform",
    "configure_flags",
    "host_platform",
    "load_matrix",
    "normalize_platform",
    "parse_matrix",
]
