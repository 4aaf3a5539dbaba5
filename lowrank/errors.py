"""User-facing errors: one line that names the problem and the fix.

Everything the CLI should report without a traceback is raised as a `LowrankError`.
"""


class LowrankError(Exception):
    """A problem caused by the user's input or environment, with a message that says the fix."""


class BudgetError(LowrankError):
    """A ratio or budget that is out of range or cannot be met."""


class CalibrationError(LowrankError):
    """Calibration or evaluation text that is missing, empty or too short."""


class ModelLoadError(LowrankError):
    """A model that cannot be found, read or understood."""
