"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class MoeditError(Exception):
    """A problem with the user's input (config, paths, data) that they can fix."""
