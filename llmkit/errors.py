"""The one error type for mistakes a user can fix (config, data, paths, hardware)."""


class LlmkitError(Exception):
    """A problem with the user's input; the message names what is wrong and how to fix it."""
