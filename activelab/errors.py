"""Errors that a user can act on. The CLI prints them without a traceback."""


class ActivelabError(ValueError):
    """Bad input or a missing resource; the message says what to do."""


class DatasetNotFoundError(ActivelabError, FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded."""


class ConfigError(ActivelabError):
    """An experiment configuration is invalid."""


class StopRound(ActivelabError):
    """A round cannot be committed (training diverged, a damaged file): the job fails, other jobs go on."""


class ExperimentBusyError(ActivelabError):
    """Another process is writing to the experiment directory."""


class ActivelabWarning(UserWarning):
    """Something the user should know that does not stop the work (a changed setting that is not used)."""
