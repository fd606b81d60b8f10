"""The built-in backends, one module each. Importing this package registers them; it never selects
one and never imports an optional package (probes run at first use)."""

from ..registry import register_backend
from .eager import EagerBackend
from .flash_attn import FlashAttnBackend
from .flash_attn3 import FlashAttn3Backend
from .flash_attn3_fp8 import FlashAttn3Fp8Backend
from .flash_attn4 import FlashAttn4Backend
from .flex import FlexBackend
from .fp8 import Fp8Backend
from .sage import SageBackend
from .sage3 import Sage3Backend
from .sage_fp8_cuda import SageFp8CudaBackend
from .sage_fp8_cuda_sm90 import SageFp8CudaSm90Backend
from .sage_fp16_cuda import SageFp16CudaBackend
from .sage_fp16_triton import SageFp16TritonBackend
from .sdpa import SdpaBackend
from .sdpa_cudnn import SdpaCudnnBackend
from .sdpa_efficient import SdpaEfficientBackend
from .sdpa_flash import SdpaFlashBackend
from .sdpa_math import SdpaMathBackend
from .xformers import XformersBackend
from .flash_attn3_hub import FlashAttn3HubBackend
from .sage_hub import SageHubBackend

BUILTIN = (SdpaBackend, SdpaCudnnBackend, SdpaFlashBackend, SdpaEfficientBackend, SdpaMathBackend,
           FlexBackend, EagerBackend,
           # third-party kernels (probed at first use; importing them imports no third-party package)
           FlashAttnBackend, FlashAttn3Backend, FlashAttn4Backend, XformersBackend,
           SageBackend, SageFp16TritonBackend, SageFp16CudaBackend, SageFp8CudaBackend, SageFp8CudaSm90Backend,
           Sage3Backend, FlashAttn3Fp8Backend,
           # attnpatch's own lossy kernel (Triton, Hopper)
           Fp8Backend)

#: prebuilt kernels from the Hugging Face hub through the `kernels` package (loaded only on request;
#: never picked by auto). Tests: tests/test_hub_kernels.py.
HUB = (FlashAttn3HubBackend, SageHubBackend)


def register_builtin() -> None:
    for cls in BUILTIN + HUB:
        register_backend(cls, replace=True)
