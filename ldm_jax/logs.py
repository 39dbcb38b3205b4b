"""The log filter every run installs: our lines tell the story, the libraries' chatter does not."""
import logging
import os


def quiet_libraries(record: logging.LogRecord) -> bool:
  """False for the records a run hides: all of orbax's, and TFDS's INFO lines.

  `checkpointing` reports an unusable checkpoint in one warning line and a failed write
  in one error line; orbax's own lines (tracebacks included) would repeat them many
  times over. TFDS's INFO chatter drowns our INFO lines.
  """
  if f'{os.sep}orbax{os.sep}' in record.pathname:
    return False
  return (record.levelno > logging.INFO or
          f'{os.sep}tensorflow_datasets{os.sep}' not in record.pathname)
