"""A directory tree of images as a TFDS dataset: `data.name='folder'`, `data.folder=PATH`.

PATH is a local directory or any URI `tf.io.gfile` reads (`gs://bucket/images`).
The layout is the one of Hugging Face's `imagefolder`:

  PATH/[SPLIT/][CLASS/...]IMAGE.{png,jpg,jpeg,bmp,gif,webp,tif,tiff}

  splits    When images lie under PATH/train/, the top-level directories `train`,
            `test` and `validation` are the splits (an image outside them is an
            error). Otherwise every image is in the split `train`; TFDS slicing such
            as `data.eval_split='train[:5%]'` then carves out an eval set.
  labels    When every image of every split lies inside a first-level directory of
            its split, that directory's name is its class (`label`, a ClassLabel with
            the sorted names); nested directories below it belong to the same class.
            An image directly in a split root means: no labels.
  captions  `IMAGE.txt` next to an image (same stem), or the `text` (or `caption`)
            column of a `metadata.jsonl` whose `file_name` is the image's path relative
            to that file's directory; a sidecar file wins. Images without one get ''.

Images are stored as their own encoded bytes (PNG, JPEG and BMP as they are; GIF,
WebP, TIFF and other formats Pillow opens are converted to PNG, GIF and TIFF by their
first frame) and decoded to RGB by TensorFlow in the input pipeline. Each file is
decoded once while the dataset is prepared, with the decoder that will read it later:
a file that fails is named in one warning line and skipped, and the count is logged,
so training never meets it.

The prepared copy lives in the TFDS data dir (`data.data_dir`) under
`folder_images/<name>_<hash>`, where the hash covers PATH and the relative names of
all its files: adding, removing or renaming files prepares a new copy on the next
run; editing a file in place under the same name does not (delete the copy then).
"""
from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SPLITS = ('train', 'test', 'validation')
METADATA_FILE = 'metadata.jsonl'
CAPTION_COLUMNS = ('text', 'caption')
# Formats that TensorFlow's `decode_image` reads as one [h, w, c] frame; others are
# converted to PNG with Pillow while preparing.
_TF_FORMATS = ('PNG', 'JPEG', 'BMP')
_LAYOUT_VERSION = 1


class FolderError(ValueError):
  """The folder cannot be read as a dataset (missing, empty, or a bad layout)."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a scan of the folder found.

  Attributes:
    root: the folder, without a trailing separator.
    split_dirs: whether the top-level directories are the splits.
    splits: split name -> sorted image paths relative to `root`.
    class_names: sorted class names, or () when the images have no labels.
    captions: relative image path -> caption, from sidecar files and metadata.jsonl.
    digest: hash of `root` and the relative names of every file under it.
  """

  root: str
  split_dirs: bool
  splits: dict[str, list[str]]
  class_names: tuple[str, ...]
  captions: dict[str, str]
  digest: str

  def in_split(self, relative: str) -> str:
    """An image's path relative to its split's root."""
    return relative.split('/', 1)[1] if self.split_dirs else relative

  def label(self, relative: str) -> int:
    """The class index of an image: its first directory below the split root."""
    return self.class_names.index(self.in_split(relative).split('/')[0])


def _walk(root: str) -> list[str]:
  """Relative paths ('/'-separated) of every file under `root`, sorted."""
  files = []
  for directory, _, names in tf.io.gfile.walk(root):
    rel_dir = directory[len(root):].strip('/')
    for name in names:
      files.append(f'{rel_dir}/{name}' if rel_dir else name)
  return sorted(files)


def _read_captions(root: str, files: list[str], images: set[str]) -> dict[str, str]:
  """Captions by relative image path: metadata.jsonl files first, then sidecar .txt."""
  captions = {}
  for relative in files:
    if relative.split('/')[-1] != METADATA_FILE:
      continue
    base = relative[: -len(METADATA_FILE)]
    with tf.io.gfile.GFile(f'{root}/{relative}') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          name = record['file_name']
        except (ValueError, KeyError, TypeError):
          raise FolderError(f'{root}/{relative}:{number} is not a JSON object with a '
                            f'"file_name"') from None
        text = next((record[c] for c in CAPTION_COLUMNS if c in record), None)
        if text is not None:
          captions[base + str(name).lstrip('./')] = str(text)
  stems = {os.path.splitext(p)[0]: p for p in images}
  for relative in files:
    stem, ext = os.path.splitext(relative)
    if ext.lower() == '.txt' and stem in stems:
      with tf.io.gfile.GFile(f'{root}/{relative}') as f:
        captions[stems[stem]] = f.read().strip()
  return captions


def scan(folder: str) -> Layout:
  """Lists the folder and settles splits, labels and captions (see the module doc).

  Raises:
    FolderError: the folder does not exist, holds no images, or mixes split
      directories with other top-level content.
  """
  root = str(folder).rstrip('/')
  if not root or not tf.io.gfile.isdir(root):
    raise FolderError(f'data.folder={folder!r} is not a directory')
  files = _walk(root)
  images = [p for p in files if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
  if not images:
    raise FolderError(f'data.folder={folder!r} has no images '
                      f'({", ".join(IMAGE_EXTENSIONS)})')
  split_dirs = any(p.startswith('train/') for p in images)
  if split_dirs:
    strays = sorted(p for p in images if p.split('/')[0] not in SPLITS)
    if strays:
      raise FolderError(f'data.folder={folder!r} has split directories, and also the image '
                        f'{strays[0]!r} outside them; accepted: images only under train/, '
                        f'test/, validation/')
    splits = {s: [p for p in images if p.startswith(f'{s}/')] for s in SPLITS}
    splits = {s: paths for s, paths in splits.items() if paths}
  else:
    splits = {'train': images}
  layout = Layout(root=root, split_dirs=split_dirs, splits=splits, class_names=(),
                  captions=_read_captions(root, files, set(images)),
                  digest=hashlib.sha256(json.dumps([_LAYOUT_VERSION, root, files]).encode())
                  .hexdigest())
  in_split = [layout.in_split(p) for p in images]
  if all('/' in p for p in in_split):
    layout = dataclasses.replace(
        layout, class_names=tuple(sorted({p.split('/')[0] for p in in_split})))
  return layout


def _config_name(layout: Layout) -> str:
  base = re.sub(r'[^a-z0-9_]', '_', layout.root.split('/')[-1].lower()).strip('_') or 'folder'
  return f'{base[:40]}_{layout.digest[:12]}'


def _encoded_image(data: bytes) -> bytes | np.ndarray:
  """The bytes to store for one file: as they are, or a decoded RGB array to store as PNG.

  Raises:
    Exception: whatever Pillow or TensorFlow raise for a file they cannot decode.
  """
  with Image.open(io.BytesIO(data)) as image:
    if image.format in _TF_FORMATS:
      # Decoded once with the decoder (and channel count) of the input pipeline.
      tf.io.decode_image(data, channels=3, expand_animations=False)
      return data
    image.seek(0)
    return np.asarray(image.convert('RGB'))


class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The images under one folder, prepared once into the TFDS data dir."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images, class labels from directories, captions.'}

  # As for `digits`: TFDS would ask importlib_resources, an optional dependency.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, layout: Layout, **kwargs):
    self.layout = layout
    self._folder_config = tfds.core.BuilderConfig(
        name=_config_name(layout), description=f'The images under {layout.root}.')
    super().__init__(config=self._folder_config, **kwargs)

  def get_builder_config(self, name: str, version=None, **kwargs) -> tfds.core.BuilderConfig | None:
    """This folder's own config: TFDS then treats it as known, not as a custom one."""
    del version, kwargs
    return self._folder_config if name == self._folder_config.name else None

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        'image': tfds.features.Image(shape=(None, None, 3)),
        'caption': tfds.features.Text(),
        'file_name': tfds.features.Text(),
    }
    if self.layout.class_names:
      features['label'] = tfds.features.ClassLabel(names=self.layout.class_names)
    return self.dataset_info_from_configs(
        description=f'The images under {self.layout.root}.',
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the files are read where they are.
    return {split: self._generate_examples(split) for split in self.layout.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    layout, skipped = self.layout, []
    for relative in layout.splits[split]:
      path = f'{layout.root}/{relative}'
      try:
        with tf.io.gfile.GFile(path, 'rb') as f:
          image = _encoded_image(f.read())
      except Exception as e:  # pylint: disable=broad-except
        # Any decoder failure (truncated, not an image, unsupported mode) skips the file.
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        logging.warning('folder: skipping unreadable image %s (%s)', path, reason)
        skipped.append(relative)
        continue
      example = {'image': image, 'caption': layout.captions.get(relative, ''),
                 'file_name': relative}
      if layout.class_names:
        example['label'] = layout.label(relative)
      yield relative, example
    if skipped:
      logging.warning('folder: %d unreadable image(s) skipped in split %r of %s',
                      len(skipped), split, layout.root)
    self.info.metadata[f'skipped_{split}'] = skipped


@functools.lru_cache(maxsize=8)
def builder(folder: str, data_dir: str | None = None) -> FolderImages:
  """The builder of the images under `folder` (prepare it with `download_and_prepare`).

  The folder is listed once per process (listing a bucket of many files takes a while);
  a run sees the files that were there when it started.

  Raises:
    FolderError: see `scan`.
  """
  return FolderImages(layout=scan(folder), data_dir=data_dir)


def identity(folder: str) -> str:
  """A name for the folder's contents: its name and a hash of its path and file names."""
  return _config_name(scan(folder))


def skipped_files(folder_builder: FolderImages) -> dict[str, list[str]]:
  """Split -> the relative paths skipped as unreadable when the dataset was prepared."""
  metadata = folder_builder.info.metadata or {}
  return {k[len('skipped_'):]: list(v) for k, v in metadata.items() if k.startswith('skipped_')}
