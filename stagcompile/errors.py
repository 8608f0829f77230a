"""The error type every stage raises for bad input; the CLI prints it as one line and exits 1."""


class StagError(Exception):
    """A user-facing error: the message names the file, tensor, field or flag and what was
    expected."""


class CheckpointError(StagError):
    """A checkpoint directory that cannot be used."""


class Terminated(BaseException):
    """SIGTERM arrived while a stage was writing its output (raised so the output's staging
    folder is removed on the way out; the CLI exits with status 143)."""
