"""The layer-wise engine (engine.py), activation capture, statistics per distinct input (stats.py),
calibration profiles and the resumable work directory. Import the modules directly: this package
re-exports only the statistics types, which the methods read, so that importing a method does not
import the engine (which imports the methods)."""
from .stats import GroupStats, InputStats

__all__ = ["GroupStats", "InputStats"]
