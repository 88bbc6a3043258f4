"""Errors that a user can act on. The CLI prints them without a traceback."""


class ActivelabError(ValueError):
    """Bad input or a missing resource; the message says what to do."""


class DatasetNotFoundError(ActivelabError, FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded."""


class ConfigError(ActivelabError):
    """An experiment configuration is invalid."""
