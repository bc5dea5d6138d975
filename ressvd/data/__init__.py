from .calibration import sample_calibration
from .paths import data_dir
from .texts import (DatasetNotFoundError, EvaluationOverlapError, HeldOutSplitError, calibration_source,
                    check_evaluation_disjoint, check_training_source, evaluation_dataset, joined_text, load_rows)

__all__ = ["DatasetNotFoundError", "EvaluationOverlapError", "HeldOutSplitError", "calibration_source",
           "check_evaluation_disjoint", "check_training_source", "data_dir", "evaluation_dataset", "joined_text",
           "load_rows", "sample_calibration"]
