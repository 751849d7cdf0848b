"""deepseek-fp4: DeepSeek-V3/R1 inference with NVFP4 weights on GPUs far smaller than the model."""

__version__ = "0.1.0"

from . import fp8_ops, moe_ops, ops  # noqa: F401  (register torch.ops.dsfp4.*)
from ._ext import has_cuda_kernels  # noqa: F401
from .fp8_ops import Fp8Weight  # noqa: F401
from .ops import Fp4Weight  # noqa: F401
from .engine import Completion, Engine, GenerationStats  # noqa: F401,E402
from .guard import EngineBusyError, GenerationError  # noqa: F401,E402
from .inference import DeepseekInference  # noqa: F401,E402
from .sampling import SamplingParams  # noqa: F401,E402
from .precision import PrecisionPolicy  # noqa: F401,E402
from .resident import ResidentWeightStore  # noqa: F401,E402
from .weights import WeightStore  # noqa: F401,E402
from .monitor import PerfMonitor  # noqa: F401,E402
from .report import PerfVisualizer, generate_report  # noqa: F401,E402
from .tuner import AutoTuner  # noqa: F401,E402
from .ceilings import measure_ceilings  # noqa: F401,E402
