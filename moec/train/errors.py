"""Why a run stops early: errors whose message is for the user, raised by the trainer and the pipeline step."""


class TrainingError(RuntimeError):
    """A run that cannot go on: the message is for the user (no traceback)."""


class Aborted(TrainingError):
    """A second SIGINT / SIGTERM: stop now, without finishing the step or saving."""
