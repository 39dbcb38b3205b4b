"""Files on any filesystem TensorFlow reaches: local paths, `file://`, `gs://`, ...

Every file the project reads or writes under a workdir (and the datasets, weights
and vocabularies it reads) goes through these functions, so a workdir may be a
`gs://bucket/run` URI on a TPU pod as well as a local directory. They are thin
wrappers of `tf.io.gfile`; orbax reaches the same filesystems through
`etils.epath`, which `checkpoint_path` prepares paths for.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import tensorflow as tf

_LOCAL_SCHEME = 'file://'
# What a failed read or write raises: Python's errors, or TensorFlow's for gfile.
ERRORS = (OSError, tf.errors.OpError)


def has_scheme(path: str) -> bool:
  """Whether `path` is a URI such as gs://bucket/x or file:///x (not a plain path)."""
  return '://' in str(path)


def checkpoint_path(path: str) -> str:
  """`path` as orbax (epath) takes it: absolute when local; file:// URIs as plain paths.

  epath knows gs://, s3:// and friends but not file://, which names a local path.
  """
  path = str(path)
  if path.startswith(_LOCAL_SCHEME):
    return path[len(_LOCAL_SCHEME):]
  return path if has_scheme(path) else os.path.abspath(path)


def absolute(path: str) -> str:
  """`path` made absolute when it is a plain local path; URIs stay as they are."""
  return str(path) if has_scheme(path) else os.path.abspath(path)


def open(path: str, mode: str = 'r'):  # pylint: disable=redefined-builtin
  """A file object of `path` (modes as `open`'s: 'r', 'rb', 'w', 'wb', 'a')."""
  return tf.io.gfile.GFile(str(path), mode)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(str(path))


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(str(path))


def isfile(path: str) -> bool:
  return exists(path) and not isdir(path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents; an existing directory is fine."""
  tf.io.gfile.makedirs(str(path))


def listdir(path: str) -> list[str]:
  """Names in directory `path` (subdirectories without a trailing slash)."""
  return [name.rstrip('/') for name in tf.io.gfile.listdir(str(path))]


def glob(pattern: str) -> list[str]:
  return sorted(tf.io.gfile.glob(str(pattern)))


def remove(path: str) -> None:
  tf.io.gfile.remove(str(path))


def rename(source: str, target: str) -> None:
  """Renames file or directory `source` to `target`, which must not exist."""
  tf.io.gfile.rename(str(source), str(target), overwrite=False)


def rmtree(path: str) -> None:
  """Removes directory `path` and everything under it."""
  tf.io.gfile.rmtree(str(path))


def replace(source: str, target: str) -> None:
  """Renames `source` to `target`, replacing it (atomic on local filesystems)."""
  tf.io.gfile.rename(str(source), str(target), overwrite=True)


def create_exclusive(path: str, text: str) -> bool:
  """Creates file `path` holding `text` unless it exists; returns whether it did.

  Local files (plain paths, file://) are created atomically (O_EXCL). Object stores
  have no exclusive create through gfile: there `path` is checked, then written, so
  two starts within the same moment may both succeed.
  """
  path = str(path)
  if has_scheme(path) and not path.startswith(_LOCAL_SCHEME):
    if exists(path):
      return False
    write_atomic(path, text)
    return True
  try:
    fd = os.open(checkpoint_path(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


def remove_empty_dir(path: str) -> None:
  """Removes directory `path` if it exists and is empty; anything else is left alone."""
  path = str(path)
  if has_scheme(path) and not path.startswith(_LOCAL_SCHEME):
    if isdir(path) and not listdir(path):
      tf.io.gfile.rmtree(path)
    return
  try:
    os.rmdir(checkpoint_path(path))
  except OSError:  # Not empty, gone or not removable.
    pass


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file, so readers never see half of it."""
  path = str(path)
  parent = os.path.dirname(path)
  if parent:
    makedirs(parent)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data.encode() if isinstance(data, str) else data)
  replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Appends `text` to the file (created if missing) by rewriting it: works on object stores."""
  old = read_text(path) if exists(path) else ''
  write_atomic(path, old + text)


def read_text(path: str) -> str:
  with open(path, 'r') as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_text(path))


def write_json(path: str, value: Any, indent: int = 2) -> None:
  write_atomic(path, json.dumps(value, indent=indent))


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz file (read whole: remote files cannot be memory-mapped)."""
  with open(path, 'rb') as f:
    with np.load(io.BytesIO(f.read())) as data:
      return {key: data[key] for key in data.files}


def save_npz(path: str, compressed: bool = False, **arrays: np.ndarray) -> None:
  """Writes `arrays` as an .npz file, atomically."""
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  write_atomic(path, buffer.getvalue())
