"""Errors that stop a run with a message for the user rather than a traceback."""


class UserError(Exception):
  """A problem with what the user asked for; main prints its one-line message and exits non-zero."""
