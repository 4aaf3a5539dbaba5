"""lowrank: compress transformer checkpoints by low-rank factorization, then recover accuracy.

Importing the package registers the `lowrank` quantizer with transformers, so
`AutoModelForCausalLM.from_pretrained(folder)` reads compressed checkpoints.
"""

import os

# torch's OpenMP threads keep libgomp's default wait (they spin about 3 ms for the next parallel region,
# then sleep): a forward pass is thousands of short regions, and making the threads sleep at once
# (OMP_WAIT_POLICY=PASSIVE, this package's setting until stop 34) made the default compress of SmolLM2
# about 9 % slower (four alternating pairs of runs, reports/speed-notes.md). Set OMP_WAIT_POLICY yourself
# when several processes share the cores.
# Before SciPy loads its OpenBLAS (the Cholesky and eigh of `factorize`): after each call its
# worker threads spin for 2^28 cycles (about 0.1 s) waiting for more, taking a core from torch's matrix
# products; on two cores that was 8 % of the default compress of SmolLM2's processor time. With 2^4
# cycles they sleep at once. The arithmetic is the same. Set OPENBLAS_THREAD_TIMEOUT yourself to override.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .version import __version__  # noqa: E402

from . import hf_integration as _hf_integration  # noqa: E402

_hf_integration.register()

from .checkpoint import load_compressed as load  # noqa: E402
from .checkpoint import save_compressed  # noqa: E402
from .compression import compress_model  # noqa: E402
from .config import CalibrationConfig, CompressConfig, EvalConfig, RecoveryConfig  # noqa: E402
from .errors import LowrankError  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .loading import load_model  # noqa: E402
from .plan import Plan  # noqa: E402

from .api import compare, compress, evaluate, recover  # noqa: E402

__all__ = ["__version__", "compress", "recover", "evaluate", "compare", "CompressConfig", "CalibrationConfig", "RecoveryConfig",
           "EvalConfig", "load", "save_compressed", "compress_model", "load_model", "LowrankError", "LowRankLinear",
           "Plan"]
