from .format import CorruptCheckpointError, is_compressed_checkpoint
from .load import load_compressed
from .save import save_compressed

__all__ = ["CorruptCheckpointError", "is_compressed_checkpoint", "load_compressed", "save_compressed"]
