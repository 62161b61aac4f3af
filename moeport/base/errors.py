"""Errors the user can cause, reported as one line and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (profile, checkpoint, command line, launch).

    The message is one line that says what is wrong, where (file, key path,
    tensor name) and what was expected; the CLI prints it without a traceback.
    """
