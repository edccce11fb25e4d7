"""What can stop a step, by what happened. A step reports each in one line and exits with its code
(mnistflow/cli.py): 2 for what the user can fix by giving something else, 1 for a check that said no.
"""


class StepError(Exception):
    """Stops a step with one line; the message names the value and what is allowed or what to do."""
    exit_code = 2
    verdict = "error"


class ConfigError(StepError):
    """A setting that is not allowed: a flag, a parameter, a search space or a run to resume."""


class NotFound(StepError):
    """No such run, experiment, model version or metric in the tracking store."""


class AccessError(StepError):
    """The tracking server cannot be reached, or refuses this client, or would get the key in clear."""


class StoreError(StepError):
    """A tracking, artifact, registry or Optuna store failed to read or write."""


class ModelError(StepError):
    """A model that cannot be loaded, may not be (it could run code), or does not fit the data."""


class DataError(StepError):
    """The dataset's files are missing or cannot be read."""


class OutputError(StepError):
    """An output file (a plot, a payload) that could not be written where it was asked for."""


class Diverged(StepError):
    """Training stopped: its loss became NaN or infinite, and so would every later epoch's."""
    exit_code = 1


class ImageError(StepError):
    """An image file that is missing, empty, not an image, too large, or shows nothing."""


class Refused(StepError):
    """The production gate or the champion said no; the registry was left as it was."""
    exit_code = 1
    verdict = "refused"


class Breached(StepError):
    """The monitor found a limit breached: drift, or live accuracy too low. Its run was logged."""
    exit_code = 1
    verdict = "breach"


class StepFailed(StepError):
    """Work the step launched failed (a chained step, a tune worker); its own output says why."""
    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An error's message cut to its first line, for the one-line errors the steps print."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
