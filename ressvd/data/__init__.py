from .calibration import sample_calibration
from .paths import data_dir
from .texts import DatasetNotFoundError, joined_text, load_rows

__all__ = ["DatasetNotFoundError", "data_dir", "joined_text", "load_rows", "sample_calibration"]
