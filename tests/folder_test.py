"""Image folders as datasets: layout, corrupt files, the pipeline, and a two-stage run."""
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ldm_jax import input_pipeline
from ldm_jax.datasets import folder
from ldm_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPTIONS = {'cat/c0.png': 'a red cat', 'cat/c1.png': 'a small cat', 'dog/d1.jpg': 'a brown dog',
            'dog/more/d9.jpg': 'a dog again'}


def make_folder(root: pathlib.Path) -> pathlib.Path:
  """PNG, JPEG, GIF and WebP images in two class directories, captions, one corrupt file."""
  rng = np.random.default_rng(0)
  for name in ('cat', 'dog/more'):
    (root / name).mkdir(parents=True)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(root / f'cat/c{i}.png')
    Image.fromarray(rng.integers(0, 255, (36, 36), np.uint8)).save(root / f'dog/d{i}.jpg')
  Image.fromarray(rng.integers(0, 255, (30, 30), np.uint8)).save(root / 'dog/more/d9.jpg')
  Image.fromarray(rng.integers(0, 255, (30, 30, 3), np.uint8)).save(root / 'cat/anim.gif')
  Image.fromarray(rng.integers(0, 255, (30, 30, 4), np.uint8)).save(root / 'cat/alpha.webp')
  (root / 'dog/broken.png').write_bytes(b'\x89PNG\r\n\x1a\nthe rest is missing')
  (root / 'cat/c0.txt').write_text('a red cat\n')  # Sidecar captions.
  (root / 'cat/c1.txt').write_text('a small cat')
  (root / 'dog/metadata.jsonl').write_text(  # Hugging Face imagefolder captions.
      json.dumps({'file_name': 'd1.jpg', 'text': 'a brown dog'}) + '\n' +
      json.dumps({'file_name': 'more/d9.jpg', 'text': 'a dog again'}) + '\n')
  return root


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> pathlib.Path:
  return make_folder(tmp_path_factory.mktemp('folder') / 'pets')


def data_config(images, data_dir, **overrides):
  from configs import tiny

  config = tiny.get_config()
  config.data.update(name='folder', folder=str(images), data_dir=str(data_dir), num_channels=3,
                     batch_size=4, eval_split='train[:50%]', **overrides)
  return config.data


def test_scan_finds_classes_captions_and_splits(images, tmp_path):
  layout = folder.scan(str(images))
  assert list(layout.splits) == ['train'] and len(layout.splits['train']) == 16
  assert layout.class_names == ('cat', 'dog')
  assert layout.captions == CAPTIONS
  assert layout.label('dog/more/d9.jpg') == 1  # Nested directories keep their class.

  # Split directories; an image directly in a split root means no labels.
  for split, name in (('train', 'a/x.png'), ('train', 'b/y.png'), ('test', 'z.png')):
    (tmp_path / 'splits' / split / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'splits' / split / name)
  layout = folder.scan(str(tmp_path / 'splits'))
  assert layout.splits == {'train': ['train/a/x.png', 'train/b/y.png'], 'test': ['test/z.png']}
  assert layout.class_names == ()

  Image.new('RGB', (8, 8)).save(tmp_path / 'splits' / 'stray.png')
  with pytest.raises(folder.FolderError, match="stray.png"):
    folder.scan(str(tmp_path / 'splits'))
  with pytest.raises(folder.FolderError, match='not a directory'):
    folder.scan(str(tmp_path / 'missing'))


def test_corrupt_file_is_named_skipped_and_counted(images, tmp_path, caplog):
  config = data_config(images, tmp_path / 'tfds')
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.dataset_info(config)
  skipped = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert skipped == [f'folder: skipping unreadable image {images}/dog/broken.png '
                     f'(Truncated File Read)',
                     f"folder: 1 unreadable image(s) skipped in split 'train' of {images}"]
  assert info == input_pipeline.DatasetInfo(num_examples={'train': 15}, num_classes=2)
  assert folder.skipped_files(input_pipeline.prepared_builder(config)) == {
      'train': ['dog/broken.png']}

  # Every readable file is an example, with its label and caption; GIF and WebP as RGB.
  builder = input_pipeline.prepared_builder(config)
  examples = {e['file_name'].decode(): e for e in builder.as_dataset(split='train')
              .as_numpy_iterator()}
  assert len(examples) == 15 and 'dog/broken.png' not in examples
  assert {k: e['caption'].decode() for k, e in examples.items() if e['caption']} == CAPTIONS
  assert all(e['label'] == (k.startswith('dog/')) for k, e in examples.items())
  assert examples['cat/alpha.webp']['image'].shape == (30, 30, 3)
  original = np.asarray(Image.open(images / 'cat/c2.png'))
  np.testing.assert_array_equal(examples['cat/c2.png']['image'], original)  # Lossless bytes.

  # An unchanged folder is not prepared again; a new file prepares a new copy.
  assert input_pipeline.prepared_builder(config).builder_config.name == \
      builder.builder_config.name
  Image.new('RGB', (8, 8)).save(images / 'cat/new.png')
  try:
    assert folder.scan(str(images)).digest != builder.layout.digest
  finally:
    (images / 'cat/new.png').unlink()


def test_pipeline_is_deterministic_resumable_and_sharded(images, tmp_path):
  config = data_config(images, tmp_path / 'tfds', random_flip=True)
  stream = lambda start: input_pipeline.create_dataset(
      config, 'train', train=True, seed=3, start_step=start, process_index=0,
      process_count=1).as_numpy_iterator()
  batches = [next(iter_) for iter_ in [stream(0)] for _ in range(6)]
  assert batches[0]['image'].shape == (4, 32, 32, 3)
  assert -1 <= batches[0]['image'].min() < 0 < batches[0]['image'].max() <= 1
  resumed = stream(4)  # Steps 4 and 5 straddle the epoch of 15 examples.
  for expected in batches[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])

  # Two processes' eval passes split the examples between them.
  names = lambda example, image: {'name': tf.strings.to_hash_bucket_fast(
      example['file_name'], 1 << 30)}
  parts = [[n for b in input_pipeline.create_dataset(
      config, 'train', train=False, seed=0, process_index=i, process_count=2,
      features=names).as_numpy_iterator() for n, m in zip(b['name'], b['mask']) if m]
      for i in range(2)]
  assert len(parts[0]) + len(parts[1]) == 15 and not set(parts[0]) & set(parts[1])


def test_bad_folder_configs_are_user_errors(images, tmp_path):
  with pytest.raises(UserError, match='has no images'):
    input_pipeline.dataset_info(data_config(tmp_path, tmp_path / 'tfds'))
  flat = tmp_path / 'flat'
  flat.mkdir()
  Image.new('RGB', (8, 8)).save(flat / 'one.png')
  with pytest.raises(UserError, match="data.label_key=''"):
    input_pipeline.dataset_info(data_config(flat, tmp_path / 'tfds'))
  config = data_config(images, tmp_path / 'tfds')
  config.name = 'digits'
  with pytest.raises(UserError, match="data.folder="):
    input_pipeline.dataset_info(config)


def run_main(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  return subprocess.run([sys.executable, '-m', 'ldm_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_text_to_image_on_a_folder_trains_and_resumes_through_a_file_uri(images, tmp_path):
  """Both stages on the folder's captions, resumed, then its latent cache: all under file://."""
  workdir = tmp_path / 'run'
  args = [f'--config={ROOT}/configs/tiny.py', f'--workdir=file://{workdir}',
          '--config.data.name=folder', f'--config.data.folder={images}',
          f'--config.data.data_dir={tmp_path / "tfds"}', '--config.data.num_channels=3',
          '--config.data.eval_split=train[:8]', '--config.data.batch_size=8',
          '--config.diffusion.conditioning.name=text', '--config.diffusion.model.context_dim=16',
          '--config.diffusion.conditioning.text.vocab_size=16',
          '--config.diffusion.conditioning.text.max_length=4',
          '--config.diffusion.conditioning.text.num_heads=2',
          '--config.diffusion.conditioning.text.num_layers=1',
          '--config.sample.num_samples=4', '--config.sample.batch_size=4']
  result = run_main(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'skipping unreadable image {images}/dog/broken.png' in result.stderr
  for stage in ('autoencoder', 'diffusion'):
    assert sorted(os.listdir(workdir / stage / 'checkpoints')) == ['2', '4'], stage
    assert any(f.startswith('events') for f in os.listdir(workdir / stage / 'tensorboard'))
  vocabulary = (workdir / 'diffusion' / 'vocabulary.txt').read_text().split()
  assert {'cat', 'dog', 'red', 'brown'} <= set(vocabulary)
  assert json.loads((workdir / 'config.json').read_text())['data']['folder'] == str(images)
  assert np.load(workdir / 'samples' / 'samples_4.npz')['images'].shape == (4, 32, 32, 3)

  result = run_main(*args, '--config.diffusion.num_train_steps=6')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'autoencoder: finished (step 4)' in result.stderr
  assert 'diffusion: resumed from step 4' in result.stderr
  assert 'skipping unreadable' not in result.stderr  # Prepared once.
  assert sorted(os.listdir(workdir / 'diffusion' / 'checkpoints')) == ['4', '6']
  assert (workdir / 'samples' / 'samples_6.npz').exists()

  # The latent cache of the folder, also under the file:// workdir.
  result = run_main(*args, '--mode=encode')
  assert result.returncode == 0, result.stderr[-3000:]
  cache = workdir / 'latents'
  assert json.loads((cache / 'fingerprint.json').read_text())['fingerprint']['folder'] == \
      folder.identity(str(images))
  assert json.loads((cache / 'done-p00000.json').read_text())['num_examples'] == 15


def test_latent_cache_fingerprint_names_the_folder_and_its_files(images, tmp_path):
  from configs import tiny
  from ldm_jax import latent_cache

  config = tiny.get_config()
  config.data.update(data_config(images, tmp_path / 'tfds'))
  params = {'w': np.zeros(2, np.float32)}
  before = latent_cache.fingerprint(config, params)
  assert before['folder'].startswith('pets_')
  Image.new('RGB', (8, 8)).save(images / 'cat/new.png')
  try:  # A cache of the old files must not be reused for the new ones.
    assert latent_cache.fingerprint(config, params)['folder'] != before['folder']
  finally:
    (images / 'cat/new.png').unlink()
  config.data.update(name='digits', folder='')
  assert 'folder' not in latent_cache.fingerprint(config, params)
