"""The one error type for mistakes a user can fix (config, data, paths, hardware)."""

USER_ERROR = 2  # the exit code of a mistake the user can fix (argparse's too)


class LlmkitError(Exception):
    """A problem with the user's input; the message names what is wrong and how to fix it. `on_every_rank`: every
    rank of the run raises it together (rank 0 found it and told the others), so only rank 0 reports it."""

    def __init__(self, message: str, on_every_rank: bool = False):
        super().__init__(message)
        self.on_every_rank = on_every_rank
