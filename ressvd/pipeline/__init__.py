"""The run plan and its stages: calibrate → allocate → factorise → heal → store (one file each)."""
from .plan import CalibrationSpec, Eligibility, RunPlan
from .report import CompressionReport, checkpoint_record
from .run import STAGES, run_plan
from .state import RunContext, RunState

__all__ = ["STAGES", "CalibrationSpec", "CompressionReport", "Eligibility", "RunContext", "RunPlan", "RunState",
           "checkpoint_record", "run_plan"]
