"""The built-in backends, one module each. Importing this package registers them; it never selects
one and never imports an optional package (probes run at first use)."""

from ..registry import register_backend
from .eager import EagerBackend
from .flex import FlexBackend
from .sdpa import SdpaBackend
from .sdpa_cudnn import SdpaCudnnBackend
from .sdpa_efficient import SdpaEfficientBackend
from .sdpa_flash import SdpaFlashBackend
from .sdpa_math import SdpaMathBackend

BUILTIN = (SdpaBackend, SdpaCudnnBackend, SdpaFlashBackend, SdpaEfficientBackend, SdpaMathBackend,
           FlexBackend, EagerBackend)


def register_builtin() -> None:
    for cls in BUILTIN:
        register_backend(cls, replace=True)
