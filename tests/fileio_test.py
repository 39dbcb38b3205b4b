"""Files through tf.io.gfile: file:// URIs behave as paths, and no module bypasses fileio."""
import pathlib
import re

import numpy as np

import json

from ldm_jax import fileio, latent_cache, stages, text, workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_file_uris_round_trip(tmp_path):
  uri = f'file://{tmp_path}'
  fileio.write_json(f'{uri}/a/b/info.json', {'x': 1})  # Parents are created.
  assert fileio.read_json(f'{uri}/a/b/info.json') == {'x': 1}
  assert (tmp_path / 'a' / 'b' / 'info.json').is_file()
  assert fileio.isdir(f'{uri}/a') and not fileio.isfile(f'{uri}/a')
  assert fileio.listdir(f'{uri}/a') == ['b']
  fileio.save_npz(f'{uri}/x.npz', compressed=True, images=np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(fileio.load_npz(f'{uri}/x.npz')['images'],
                                np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(np.load(tmp_path / 'x.npz')['images'], np.arange(6).reshape(2, 3))
  fileio.append_text(f'{uri}/log.txt', 'one\n')
  fileio.append_text(f'{uri}/log.txt', 'two\n')
  assert (tmp_path / 'log.txt').read_text() == 'one\ntwo\n'
  assert fileio.glob(f'{uri}/*.npz') == [f'{uri}/x.npz']
  assert not fileio.glob(f'{uri}/*.tmp')  # Atomic writes leave no temporary files.
  assert fileio.checkpoint_path(f'{uri}/ckpt') == f'{tmp_path}/ckpt'
  assert fileio.checkpoint_path('gs://bucket/ckpt') == 'gs://bucket/ckpt'

  vocabulary = text.Vocabulary.build(['a red cat', 'a dog'], vocab_size=8)
  vocabulary.save(f'{uri}/run/vocabulary.txt')
  assert text.Vocabulary.load(f'{uri}/run/vocabulary.txt').tokens == vocabulary.tokens

  # A latent cache's manifests and shards under a URI.
  directory = f'{uri}/latents'
  fileio.makedirs(directory)
  shard = {'label': np.zeros(3, np.int32), 'latent_mean': np.ones((3, 2, 2, 1), np.float32),
           'latent_logvar': np.zeros((3, 2, 2, 1), np.float32)}
  fileio.save_npz(f'{directory}/shard-p00000-000000.npz', **shard)
  layout = {'process_count': 1, 'local_batch_size': 3, 'batches_per_shard': 1}
  fileio.write_json(f'{directory}/fingerprint.json', {'fingerprint': {}, 'layout': layout})
  fileio.write_json(f'{directory}/done-p00000.json',
                    {'num_examples': 3, 'shards': [['shard-p00000-000000.npz', 3]]})
  loaded = latent_cache.load(directory, process_index=0, process_count=1)
  np.testing.assert_array_equal(loaded['latent_mean'], shard['latent_mean'])


def test_workdir_records_and_lock_under_a_file_uri(tmp_path):
  from configs import tiny

  tiny_config = tiny.get_config()
  uri = f'file://{tmp_path}/run'
  with workdir_lock.hold(uri):  # Exclusive create through the local path.
    assert json.loads((tmp_path / 'run' / '.lock').read_text())['host']
    assert not fileio.create_exclusive(f'{uri}/.lock', 'other')
    stages.prepare_workdir(uri)
    stages.save_config(tiny_config, uri)
    changed = tiny_config.copy_and_resolve_references()
    changed.seed = 7
    stages.save_config(changed, uri)  # The earlier record is kept beside it.
    assert json.loads((tmp_path / 'run' / 'config.1.json').read_text())['seed'] == tiny_config.seed
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['seed'] == 7
  assert not (tmp_path / 'run' / '.lock').exists()
  fileio.makedirs(f'{uri}/a/b')
  fileio.rename(f'{uri}/a', f'{uri}/c')  # Directories too (checkpoints moved aside).
  assert (tmp_path / 'run' / 'c' / 'b').is_dir() and not (tmp_path / 'run' / 'a').exists()
  fileio.remove_empty_dir(f'{uri}/c')  # Not empty: kept.
  assert (tmp_path / 'run' / 'c').is_dir()
  fileio.remove_empty_dir(f'{uri}/c/b')
  assert not (tmp_path / 'run' / 'c' / 'b').exists()
  fileio.rmtree(f'{uri}/c')
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['config.1.json', 'config.json']


# Direct file system calls that would fail on gs:// or file:// URIs.
_BYPASS = re.compile(r'(?<![\w.])open\(|os\.(makedirs|listdir|replace|remove|rename|rmdir|open)\(|'
                     r'os\.path\.(exists|isdir|isfile)\(|np\.(load|savez\w*)\(|glob\.glob\(|'
                     r'shutil\.\w+\(|tempfile\.mkdtemp\(|safetensors\.\w+\.(load|save)_file\(')
# The only places allowed to use them, and why.
_ALLOWED = {
    ('ablate.py', 'if not os.path.isfile(path):'): 'a sweep file is local Python to import',
    ('ablate.py', "with open(log_path, 'a') as log:"): 'a subprocess writes a local log live',
    ('rss.py', 'with open(_STATUS) as f:'): "the kernel's /proc files of this process",
    ('rss.py', "with open(_CLEAR_REFS, 'w') as f:"): "the kernel's /proc files of this process",
    ('host_memory.py', 'with open(path) as f:'): "the kernel's /sys setting of huge pages",
}


def test_library_reads_and_writes_files_only_through_fileio():
  found = []
  for path in sorted((ROOT / 'ldm_jax').rglob('*.py')):
    if path.name == 'fileio.py':
      continue
    for line in path.read_text().splitlines():
      if _BYPASS.search(line) and (path.name, line.strip()) not in _ALLOWED:
        found.append(f'{path.relative_to(ROOT)}: {line.strip()}')
  assert not found, '\n'.join(found)
