"""ressvd: post-training SVD compression of LLMs into reloadable, smaller, faster checkpoints."""
from .api import CalibrationSpec, CompressionReport, compress
from .checkpoint import CorruptCheckpointError, save_compressed as save
from .evaluation import perplexity
from .healing import heal
from .inference import optimize_for_inference
from .models.loading import load_model as load
from .pipeline import RunPlan
from .quantize import quantize_factors

__version__ = "0.1.0"
__all__ = ["CalibrationSpec", "CompressionReport", "CorruptCheckpointError", "RunPlan", "compress", "heal", "load", "optimize_for_inference",
           "perplexity", "quantize_factors", "save"]
