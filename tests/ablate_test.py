"""The ablation runner: planning, dry runs, a tiny 2-variant sweep end to end, tables."""
import csv
import json
import os
import pathlib
import shutil

import pytest
from PIL import Image

from ldm_jax import ablate
from ldm_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


# configs/tiny.py with a DiT: a variant with its own config file (another backbone).
TINY_DIT = '''
import ml_collections

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.diffusion.model = ml_collections.ConfigDict(dict(
      name='dit', patch_size=2, hidden_size=16, depth=1, num_heads=2, mlp_ratio=2.0,
      context_dim=0, remat=''))
  return config
'''


SAMPLERS = ("samplers=(dict(name='ddim4', method='ddim', num_steps=4), "
            "dict(name='ddpm8', method='ddpm', num_steps=8)),")


def write_sweep(path: pathlib.Path, data_dir: str, extra: str = '') -> str:
  dit_config = path.parent / 'tiny_dit.py'
  dit_config.write_text(TINY_DIT)
  path.write_text(f'''
def get_sweep():
  return dict(
      {extra}
      config={str(ROOT / 'configs' / 'tiny.py')!r},
      overrides={{'data.data_dir': {data_dir!r}, 'eval.num_samples': 16,
                 'eval.classifier_steps': 30}},
      variants=[dict(name='linear', overrides={{'diffusion.schedule': 'linear'}}),
                dict(name='cosine-v', config={str(dit_config)!r},
                     overrides={{'diffusion.schedule': 'cosine',
                                'diffusion.prediction_type': 'v'}})],
      seeds=(0,),
      share_autoencoder=True,
  )
''')
  return str(path)


@pytest.fixture(scope='module')
def swept(tmp_path_factory, digits_data_dir):
  """A tiny sweep run once: (sweep file, root); commands on one device, from the repo root."""
  tmp = tmp_path_factory.mktemp('ablate')
  sweep = write_sweep(tmp / 'tiny_sweep.py', digits_data_dir)
  root = str(tmp / 'runs')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
    mp.chdir(ROOT)
    ablate.run_sweep(sweep, root)
  return sweep, root


def test_dry_run_prints_one_line_per_run_and_runs_nothing(tmp_path, digits_data_dir, capsys):
  sweep = write_sweep(tmp_path / 'sweep.py', digits_data_dir)
  root = tmp_path / 'never_created'
  ablate.run_sweep(sweep, str(root), dry_run=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert not root.exists()
  assert len(lines) == 3  # The shared first stage, then one line per variant × seed.
  assert '--mode=train_autoencoder' in lines[0]
  for line, name in zip(lines[1:], ('linear', 'cosine-v')):
    train, evaluate = line.split(' && ')
    assert train.startswith('python -m ldm_jax.main ') and '--mode=train ' in train + ' '
    assert '--mode=eval' in evaluate
    assert f'--workdir={root}/{name}/seed_0' in train
    assert f'--config.autoencoder.workdir={root}/autoencoder' in train
  assert '--config.diffusion.prediction_type=v' in lines[2]
  assert f'--config={tmp_path}/tiny_dit.py ' in lines[2]  # The variant's own config file.
  assert '/configs/tiny.py ' in lines[0] + ' ' and '/configs/tiny.py ' in lines[1]


def test_dry_run_with_samplers_evaluates_each_run_once_per_sampler(tmp_path, digits_data_dir,
                                                                   capsys):
  sweep = write_sweep(tmp_path / 'sweep.py', digits_data_dir, SAMPLERS)
  ablate.run_sweep(sweep, str(tmp_path / 'runs'), dry_run=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  train, ddim, move_ddim, ddpm, move_ddpm = lines[1].split(' && ')
  assert '--mode=train ' in train and 'sample.method' not in train  # Trained once.
  eval_dir = f'{tmp_path}/runs/linear/seed_0/eval'
  for command, move, method, steps, name in ((ddim, move_ddim, 'ddim', 4, 'ddim4'),
                                             (ddpm, move_ddpm, 'ddpm', 8, 'ddpm8')):
    assert '--mode=eval' in command
    assert f'--config.sample.method={method} --config.sample.num_steps={steps}' in command
    assert move == f'mv {eval_dir}/metrics_4.json {eval_dir}/metrics_4.{name}.json'
  ablate.run_sweep(sweep, str(tmp_path / 'runs'), dry_run=True, samplers=['ddpm8'], seeds=[0])
  line = capsys.readouterr().out.strip().splitlines()[1]
  assert line.count('--mode=eval') == 1 and 'metrics_4.ddpm8.json' in line
  with pytest.raises(UserError, match="unknown samplers \\['ddim'\\]"):
    ablate.plan(ablate.load_sweep(sweep), str(tmp_path), samplers=['ddim'])
  with pytest.raises(UserError, match='seeds \\[3\\] the sweep does not have'):
    ablate.plan(ablate.load_sweep(sweep), str(tmp_path), seeds=[3])
  bad = write_sweep(tmp_path / 'bad.py', digits_data_dir,
                    "samplers=(dict(name='a', method='ddim'), dict(name='a', num_steps=2)),")
  with pytest.raises(UserError, match='samplers must be dicts with unique names'):
    ablate.load_sweep(bad)
  bad = write_sweep(tmp_path / 'bad.py', digits_data_dir, "samplers=(dict(name='a', stesp=2),),")
  with pytest.raises(UserError, match="unknown config field 'sample.stesp'"):
    ablate.plan(ablate.load_sweep(bad), str(tmp_path))


def test_only_selects_a_variant_and_rejects_unknown_names(tmp_path, digits_data_dir):
  sweep = ablate.load_sweep(write_sweep(tmp_path / 'sweep.py', digits_data_dir))
  runs = ablate.plan(sweep, str(tmp_path), only=['cosine-v'])
  assert [(r.variant, r.seed) for r in runs] == [('cosine-v', 0)]
  assert runs[0].overrides['diffusion.schedule'] == 'cosine'
  with pytest.raises(UserError, match="unknown variants \\['nope'\\]"):
    ablate.plan(sweep, str(tmp_path), only=['nope'])


def test_a_variant_config_must_match_the_shared_first_stage(tmp_path, digits_data_dir):
  sweep = ablate.load_sweep(write_sweep(tmp_path / 'sweep.py', digits_data_dir))
  sweep['variants'][1]['overrides']['autoencoder.model.latent_channels'] = 4
  with pytest.raises(UserError, match="variant 'cosine-v'.*differ from those of the shared"):
    ablate.plan(sweep, str(tmp_path))
  sweep['share_autoencoder'] = False  # Each run then trains its own first stage.
  assert len(ablate.plan(sweep, str(tmp_path))) == 2


def test_bad_sweep_files_stop_with_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_sweep():\n  return dict(config="c.py", variants=[], sedes=(0,))\n')
  with pytest.raises(UserError, match="unknown keys \\['sedes'\\]"):
    ablate.load_sweep(str(bad))
  bad.write_text('def get_sweep():\n  return dict(config="c.py", variants=[{"name": "a b"}])\n')
  with pytest.raises(UserError, match='variant names'):
    ablate.load_sweep(str(bad))
  bad.write_text('def get_sweep():\n  return dict(config="c.py", variants=[{"name": "a", '
                 '"confg": "d.py"}])\n')
  with pytest.raises(UserError, match="variant 'a' has unknown keys \\['confg'\\]"):
    ablate.load_sweep(str(bad))
  with pytest.raises(UserError, match='not found'):
    ablate.load_sweep(str(tmp_path / 'missing.py'))


def test_sweep_writes_results_table_and_plots(swept):
  _, root = swept
  with open(os.path.join(root, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['variant'] for r in rows] == ['linear', 'cosine-v']
  for row in rows:
    assert float(row['train_seconds']) > 0
    assert float(row['train_img_per_s']) > 0
    assert float(row['train_gflops_per_image']) > 0
    assert 0 < float(row['final_loss']) < 10
    assert 0 <= float(row['class_accuracy']) <= 1
    assert float(row['fd_classifier']) >= 0
  # The U-Net and the DiT variant are counted separately.
  assert rows[0]['train_gflops_per_image'] != rows[1]['train_gflops_per_image']
  table = pathlib.Path(root, 'results.md').read_text()
  assert 'train_gflops_per_image' in table and 'train_img_per_s' in table
  assert '| linear |' in table and '| cosine-v |' in table and '*real vs real*' in table
  assert table.count('**') >= 2  # Some column has a best value in bold.
  for name in ('loss_curves.png', 'metrics.png'):
    with Image.open(os.path.join(root, name)) as image:
      assert image.format == 'PNG' and image.size[0] > 200


def test_second_invocation_trains_nothing(swept, monkeypatch):
  sweep, root = swept
  before = pathlib.Path(root, 'results.csv').read_text()

  def fail(command, log_path):
    raise AssertionError(f'ran {command}')

  monkeypatch.setattr(ablate, '_execute', fail)
  # Each run's FLOPs were counted once and kept.
  monkeypatch.setattr(ablate, 'train_flops_per_image', fail)
  monkeypatch.chdir(ROOT)
  ablate.run_sweep(sweep, root)
  after = pathlib.Path(root, 'results.csv').read_text()
  assert after == before


def test_samplers_evaluate_trained_runs_without_training_and_tabulate_per_sampler(
    swept, tmp_path, digits_data_dir, monkeypatch):
  """Two samplers on a copy of the trained sweep: only evaluations run, once each, and
  the table has a row per variant and sampler, the best marked among each sampler's rows."""
  _, root = swept
  copy = tmp_path / 'runs'
  shutil.copytree(root, copy)
  sweep = write_sweep(tmp_path / 'sweep.py', digits_data_dir, SAMPLERS)
  executed = []

  def fake_eval(command, log_path):  # The eval mode's record, its FD scaled per sampler.
    assert '--mode=eval' in command, command
    executed.append(command)
    workdir = next(a for a in command if a.startswith('--workdir=')).split('=', 1)[1]
    path = os.path.join(workdir, 'eval', 'metrics_4.json')
    with open(os.path.join(root, os.path.relpath(path, copy))) as f:
      record = json.load(f)
    record['fd_classifier'] *= 2.0 if 'ddpm' in ' '.join(command) else 0.5
    with open(path, 'w') as f:
      json.dump(record, f)

  monkeypatch.setattr(ablate, '_execute', fake_eval)
  monkeypatch.chdir(ROOT)
  ablate.run_sweep(sweep, str(copy), results_dir=str(tmp_path / 'results'))
  assert len(executed) == 4  # 2 runs × 2 samplers, no training.
  with open(tmp_path / 'results' / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['variant'], r['sampler']) for r in rows] == [
      ('linear', 'ddim4'), ('linear', 'ddpm8'), ('cosine-v', 'ddim4'), ('cosine-v', 'ddpm8')]
  assert float(rows[1]['fd_classifier']) == pytest.approx(4 * float(rows[0]['fd_classifier']))
  table = (tmp_path / 'results' / 'results.md').read_text().splitlines()
  assert table[4].startswith('| variant | sampler | fd_classifier |')
  body = {tuple(c.strip() for c in line.split('|')[1:3]): line for line in table[6:]}
  assert set(body) >= {('linear', 'ddim4'), ('linear', 'ddpm8'), ('cosine-v', 'ddim4'),
                       ('cosine-v', 'ddpm8')}
  for sampler in ('ddim4', 'ddpm8'):  # One best FD per sampler.
    fd_cells = [body[v, sampler].split('|')[3] for v in ('linear', 'cosine-v')]
    assert sum('**' in c for c in fd_cells) == 1
  ablate.run_sweep(sweep, str(copy), results_dir=str(tmp_path / 'results'))
  assert len(executed) == 4  # Every evaluation was done: nothing runs again.


def test_markdown_marks_the_best_mean_in_the_right_direction(tmp_path):
  rows = [
      dict(variant='a', seed=0, fd_classifier=5.0, class_accuracy=0.9, fd_classifier_real=1.0),
      dict(variant='a', seed=1, fd_classifier=7.0, class_accuracy=0.8, fd_classifier_real=1.0),
      dict(variant='b', seed=0, fd_classifier=3.0, class_accuracy=0.5, fd_classifier_real=1.0),
      dict(variant='b', seed=1, fd_classifier=3.0, class_accuracy=0.7, fd_classifier_real=1.0),
  ]
  summary = ablate.summarize(rows)
  assert summary['a']['fd_classifier'] == pytest.approx((6.0, 2 ** 0.5))
  assert summary['b']['class_accuracy'] == pytest.approx((0.6, 2 ** 0.5 / 10))
  path = tmp_path / 'results.md'
  ablate.write_markdown(rows, str(path), 'study')
  lines = {line.split('|')[1].strip(): line for line in path.read_text().splitlines()
           if line.startswith('| ')}
  assert '**3 ± 0**' in lines['b']              # Lower FD is better.
  assert '**0.85 ± 0.071**' in lines['a']       # Higher accuracy is better.
  assert lines['*real vs real*'].split('|')[2].strip() == '1'


def test_flags_round_trip_through_the_shell():
  assert ablate._flag('data.name', 'my data') == "'--config.data.name=my data'"
  assert ablate._flag('model.channel_mult', (1, 2)) == "'--config.model.channel_mult=(1,2)'"
  assert ablate._flag('model.channel_mult', (4,)) == "'--config.model.channel_mult=(4,)'"
  assert ablate._flag('seed', 3) == '--config.seed=3'
  assert ablate.lower_is_better('fd_classifier') and ablate.lower_is_better('kid')
  assert not ablate.lower_is_better('class_accuracy') and not ablate.lower_is_better('ae_psnr')
