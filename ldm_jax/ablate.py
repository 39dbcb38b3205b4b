"""Ablation runner: a grid of config variants × seeds, trained, evaluated and tabulated.

    python -m ldm_jax.ablate --sweep=experiments/schedule_x_prediction.py --workdir=runs/sxp

A sweep file defines `get_sweep()` returning a dict:

    config:    the base config file, e.g. 'configs/default.py'.
    overrides: {'dotted.field': value} applied to every variant (the study's budget).
    variants:  [{'name': 'cosine-v', 'overrides': {'diffusion.schedule': 'cosine', ...}}, ...];
               a variant may also name its own `config` file (e.g. another backbone,
               whose fields the base config lacks); the sweep's overrides apply to it too.
    seeds:     (0, 1, ...): `config.seed` of each run.
    share_autoencoder: True trains stage 1 once (WORKDIR/autoencoder) and points every
               run's `autoencoder.workdir` at it, so variants differ only in stage 2
               (a variant's own config must then have the same data and stage 1).
    samplers:  optional [{'name': 'ddim50', 'method': 'ddim', 'num_steps': 50}, ...]:
               each run is trained once and evaluated once per sampler, the other
               keys being `config.sample` fields (or dotted config paths, such as
               'eval.num_samples', applied to that evaluation only); without it, once
               with the config's own sampler.

Every run's metrics use one evaluation classifier, WORKDIR/eval_classifier (unless the
sweep sets `eval.classifier_dir`), so all runs are measured in the same feature space.

Each variant × seed is ordinary commands (`--mode=train`, then `--mode=eval`, once per
sampler) in its own workdir, WORKDIR/<variant>/seed_<seed>; `--dry_run` prints them one
line per run, ready for a cluster queue. With samplers, each evaluation's record is kept
as WORKDIR/<variant>/seed_<seed>/eval/metrics_<step>.<sampler>.json. An evaluation whose
metrics exist is skipped, a trained run is not trained again, an interrupted one
resumes from its checkpoints. At the end the runner collects `results.csv` (one row per
variant × seed (× sampler)), `results.md` (mean ± std over seeds, best marked; with
samplers one row per variant and sampler, best marked among the rows of each sampler)
and the plots `loss_curves.png` and `metrics.png` into `--results_dir` (default:
WORKDIR). Besides the
metrics, each row has the cost of its stage 2: `train_gflops_per_image` (model FLOPs of
one train step per image, `bench.train_flops_per_image`, counted from shapes) and
`train_img_per_s` (measured training throughput).
"""
import csv
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from ldm_jax import evaluation, fileio, stages
from ldm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('sweep', None, 'Sweep file defining get_sweep().')
flags.DEFINE_string('workdir', None, 'Root of the runs: WORKDIR/<variant>/seed_<seed>.')
flags.DEFINE_bool('dry_run', False, 'Print the commands, one line per run; run nothing.')
flags.DEFINE_list('only', [], 'Run only these variants (names); all when empty.')
flags.DEFINE_list('seeds', [], "Run only these of the sweep's seeds; all when empty.")
flags.DEFINE_list('samplers', [], "Evaluate only with these of the sweep's samplers (names); "
                  'all when empty.')
flags.DEFINE_string('results_dir', '', 'Where results.{csv,md} and plots go (default: WORKDIR).')

# Metrics where smaller is better; every other metric is better when larger.
_LOWER_IS_BETTER = re.compile(r'(^|_)(fd|fid|rfid|kid|lpips|loss)(_|$)|seconds')


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One `--mode=eval` of a run: its sampler ('' = the config's own) and its record."""
  sampler: str
  command: tuple[str, ...]
  metrics_path: str


@dataclasses.dataclass(frozen=True)
class Run:
  """One variant × seed: its workdir and the commands that train and evaluate it."""
  variant: str
  seed: int
  workdir: str
  config: str
  overrides: dict[str, Any]
  train_command: tuple[str, ...]
  evaluations: tuple[Evaluation, ...]
  num_train_steps: int

  @property
  def commands(self) -> tuple[tuple[str, ...], ...]:
    """Train, then each evaluation."""
    return (self.train_command, *(e.command for e in self.evaluations))

  @property
  def evaluated(self) -> bool:
    return all(fileio.isfile(e.metrics_path) for e in self.evaluations)

  @property
  def trained(self) -> bool:
    return fileio.isdir(os.path.join(stages.checkpoint_dir(self.workdir, 'diffusion'),
                                     str(self.num_train_steps)))


# ------------------------------------------------------------ sweep file ----


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise UserError(f'{what} {path!r} not found')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # The file's own error, in one line.
    raise UserError(f'cannot load {what} {path!r}: {type(e).__name__}: {e}') from e
  return module


def load_sweep(path: str) -> dict[str, Any]:
  """The validated dict of a sweep file's `get_sweep()`."""
  module = _load_module(path, 'sweep file')
  if not hasattr(module, 'get_sweep'):
    raise UserError(f'sweep file {path!r} defines no get_sweep()')
  sweep = dict(module.get_sweep())
  keys = ('config', 'overrides', 'variants', 'seeds', 'share_autoencoder', 'samplers')
  unknown = set(sweep) - set(keys)
  if unknown:
    raise UserError(f'sweep {path!r}: unknown keys {sorted(unknown)}; accepted: '
                    f'{", ".join(keys)}')
  if 'config' not in sweep or 'variants' not in sweep:
    raise UserError(f'sweep {path!r} must give at least config and variants')
  sweep.setdefault('overrides', {})
  sweep.setdefault('seeds', (0,))
  sweep.setdefault('share_autoencoder', False)
  sweep.setdefault('samplers', ())
  names = [v.get('name', '') for v in sweep['variants']]
  for variant in sweep['variants']:
    unknown = set(variant) - {'name', 'overrides', 'config'}
    if unknown:
      raise UserError(f'sweep {path!r}: variant {variant.get("name", "")!r} has unknown keys '
                      f'{sorted(unknown)}; accepted: name, overrides, config')
  bad = [n for n in names if not re.fullmatch(r'[A-Za-z0-9_.+-]+', n or '')]
  if bad or len(set(names)) != len(names):
    raise UserError(f'sweep {path!r}: variant names must be unique and use only letters, '
                    f'digits and _.+- (got {names})')
  samplers = [s.get('name', '') if isinstance(s, dict) else s for s in sweep['samplers']]
  bad = [n for n in samplers if not isinstance(n, str) or not re.fullmatch(r'[A-Za-z0-9_+-]+', n)]
  if bad or len(set(samplers)) != len(samplers):
    raise UserError(f'sweep {path!r}: samplers must be dicts with unique names of letters, '
                    f'digits and _+- (got {samplers}), e.g. dict(name=\'ddim50\', '
                    f'method=\'ddim\', num_steps=50)')
  return sweep


def sampler_overrides(sampler: dict[str, Any]) -> dict[str, Any]:
  """A sweep's sampler entry as config overrides: a key without a dot is a `sample` field,
  a dotted one a whole path (e.g. 'eval.num_samples' for this evaluation only)."""
  return {k if '.' in k else f'sample.{k}': v for k, v in sampler.items() if k != 'name'}


def _config_with(config_path: str, overrides: dict[str, Any]):
  """The base config with `overrides` applied, for values the runner needs (step counts)."""
  config = _load_module(config_path, 'config file').get_config()
  for key, value in overrides.items():
    parent, _, leaf = key.rpartition('.')
    node = config
    for part in filter(None, parent.split('.')):
      node = node.get(part) if hasattr(node, 'get') else None
    if not hasattr(node, 'keys') or leaf not in node:
      raise UserError(f'unknown config field {key!r} in the sweep overrides of {config_path}')
    node[leaf] = value
  return config


def _flag(key: str, value: Any) -> str:
  if isinstance(value, (tuple, list)):
    value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
  return shlex.quote(f'--config.{key}={value}')


def _command(config_path: str, workdir: str, overrides: dict[str, Any], mode: str):
  return ('python', '-m', 'ldm_jax.main', f'--config={config_path}', f'--workdir={workdir}',
          f'--mode={mode}', *(_flag(k, v) for k, v in overrides.items()))


def autoencoder_command(sweep: dict[str, Any], root: str) -> tuple[str, ...]:
  """Stage 1 once, shared by every run of a sweep with `share_autoencoder`."""
  return _command(sweep['config'], os.path.join(root, 'autoencoder'), sweep['overrides'],
                  'train_autoencoder')


def autoencoder_trained(sweep: dict[str, Any], root: str) -> bool:
  steps = _config_with(sweep['config'], sweep['overrides']).autoencoder.num_train_steps
  return fileio.isdir(os.path.join(
      stages.checkpoint_dir(os.path.join(root, 'autoencoder'), 'autoencoder'), str(steps)))


def _stage_one(config) -> dict[str, Any]:
  """What the latents of a shared first stage depend on: the images and the autoencoder."""
  autoencoder = config.autoencoder.to_dict()
  autoencoder.pop('workdir')
  data = {k: config.data.get(k) for k in ('name', 'folder', 'data_dir', 'image_size',
                                          'num_channels')}
  return {'data': data, 'autoencoder': autoencoder}


def plan(sweep: dict[str, Any], root: str, only: Sequence[str] = (),
         seeds: Sequence[int] = (), samplers: Sequence[str] = ()) -> list[Run]:
  """The runs of a sweep (variant-major, then seed), restricted to the variants `only`,
  the seeds `seeds` and the evaluations of `samplers` (names) when given."""
  names = [v['name'] for v in sweep['variants']]
  missing = sorted(set(only) - set(names))
  if missing:
    raise UserError(f'--only names unknown variants {missing}; the sweep has {names}')
  missing = sorted(set(seeds) - set(sweep['seeds']))
  if missing:
    raise UserError(f'--seeds names seeds {missing} the sweep does not have; it has '
                    f'{list(sweep["seeds"])}')
  sampler_names = [s['name'] for s in sweep['samplers']]
  missing = sorted(set(samplers) - set(sampler_names))
  if missing:
    raise UserError(f'--samplers names unknown samplers {missing}; the sweep has '
                    f'{sampler_names}')
  shared = None
  if sweep['share_autoencoder']:
    shared = _stage_one(_config_with(sweep['config'], sweep['overrides']))
  runs = []
  for variant in sweep['variants']:
    if only and variant['name'] not in only:
      continue
    config_path = variant.get('config', sweep['config'])
    for seed in sweep['seeds']:
      if seeds and seed not in seeds:
        continue
      overrides = {**sweep['overrides'], **variant.get('overrides', {}), 'seed': seed}
      if sweep['share_autoencoder']:
        overrides['autoencoder.workdir'] = os.path.join(root, 'autoencoder')
      # Every run is measured by one evaluation classifier, trained once.
      overrides.setdefault('eval.classifier_dir', os.path.join(root, 'eval_classifier'))
      workdir = os.path.join(root, variant['name'], f'seed_{seed}')
      config = _config_with(config_path, overrides)
      if shared is not None and _stage_one(config) != shared:
        raise UserError(f'variant {variant["name"]!r}: its images or autoencoder settings differ '
                        f'from those of the shared first stage ({sweep["config"]} with the '
                        f'sweep overrides); accepted: the same, or share_autoencoder=False')
      steps = int(config.diffusion.num_train_steps)
      evaluations = []
      for sampler in sweep['samplers'] or ({'name': ''},):
        if samplers and sampler['name'] not in samplers:
          continue
        eval_overrides = {**overrides, **sampler_overrides(sampler)}
        _config_with(config_path, eval_overrides)  # An unknown sample field stops here.
        path = stages.metrics_path(workdir, steps)
        if sampler['name']:
          path = path[:-len('.json')] + f'.{sampler["name"]}.json'
        evaluations.append(Evaluation(sampler['name'],
                                      _command(config_path, workdir, eval_overrides, 'eval'),
                                      path))
      runs.append(Run(variant['name'], seed, workdir, config_path, overrides,
                      _command(config_path, workdir, overrides, 'train'), tuple(evaluations),
                      steps))
  return runs


# ---------------------------------------------------------------- running ----


def _status_path(run: Run) -> str:
  return os.path.join(run.workdir, 'ablate_status.json')


def _read_status(run: Run) -> dict[str, Any]:
  if not fileio.exists(_status_path(run)):
    return {'train_seconds': 0.0}
  return fileio.read_json(_status_path(run))


def _write_status(run: Run, status: dict[str, Any]) -> None:
  fileio.write_json(_status_path(run), status)


def _execute(command: Sequence[str], log_path: str) -> None:
  """Runs one command (this interpreter for `python`), its output appended to `log_path`."""
  argv = [sys.executable if command[0] == 'python' else command[0],
          *(shlex.split(a)[0] for a in command[1:])]
  fileio.makedirs(os.path.dirname(log_path))
  header = f'$ {" ".join(command)}\n'
  if fileio.has_scheme(log_path):
    # A subprocess writes only to a local file; its output is appended to the log after.
    with tempfile.TemporaryFile('w+') as log:
      log.write(header)
      log.flush()
      result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
      log.seek(0)
      fileio.append_text(log_path, log.read())
  else:
    with open(log_path, 'a') as log:
      log.write(header)
      log.flush()
      result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode:
    raise UserError(f'command failed (exit {result.returncode}); see {log_path}')


def dry_run_commands(run: Run) -> list[str]:
  """The shell commands of `run`: train, then each evaluation, its record moved to the
  sampler's name when the sweep lists samplers (what `execute_run` does)."""
  lines = [' '.join(run.train_command)]
  default_path = stages.metrics_path(run.workdir, run.num_train_steps)
  for evaluation in run.evaluations:
    lines.append(' '.join(evaluation.command))
    if evaluation.metrics_path != default_path:
      lines.append(f'mv {shlex.quote(default_path)} {shlex.quote(evaluation.metrics_path)}')
  return lines


def execute_run(run: Run) -> str:
  """Trains (resuming) and evaluates `run` unless done; returns what happened."""
  if run.evaluated:
    return 'done before, skipped'
  log_path = os.path.join(run.workdir, 'ablate.log')
  done = []
  if not run.trained:
    start = time.perf_counter()
    try:
      _execute(run.train_command, log_path)
    finally:  # An interrupted run's time counts too: it resumes from its checkpoints.
      status = _read_status(run)
      status['train_seconds'] += time.perf_counter() - start
      _write_status(run, status)
    done.append('trained')
  evaluated = []
  for evaluation in run.evaluations:
    if fileio.isfile(evaluation.metrics_path):
      continue
    _execute(evaluation.command, log_path)
    default_path = stages.metrics_path(run.workdir, run.num_train_steps)
    if evaluation.metrics_path != default_path:  # The record of this sampler, kept apart.
      fileio.rename(default_path, evaluation.metrics_path)
    evaluated.append(evaluation.sampler)
  samplers = [s for s in evaluated if s]
  done.append('evaluated' + (f' ({", ".join(samplers)})' if samplers else ''))
  return ' and '.join(done)


# ---------------------------------------------------------------- results ----


def loss_curve(workdir: str, tag: str = 'train/loss') -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of a scalar in the run's stage-2 TensorBoard logs."""
  import tensorflow as tf  # Only to read event files.

  points = {}
  for path in fileio.glob(os.path.join(stages.tensorboard_dir(workdir, 'diffusion'),
                                       'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          points[event.step] = float(tf.make_ndarray(value.tensor))
  steps = np.asarray(sorted(points))
  return steps, np.asarray([points[s] for s in steps])


def train_images_per_second(workdir: str, batch_size: int) -> float:
  """Stage-2 training throughput: median of the logged steps/s times the batch size.

  The first logged interval of a run includes compilation and is left out when there
  are others; the median also discounts the first interval after a resume.
  """
  _, rates = loss_curve(workdir, 'train/steps_per_sec')
  if len(rates) > 1:
    rates = rates[1:]
  return float(np.median(rates)) * batch_size if len(rates) else float('nan')


def train_flops_per_image(config_path: str, overrides: dict[str, Any]) -> float:
  """Model FLOPs of one stage-2 train step per image (`bench.train_flops_per_image`)."""
  from ldm_jax import bench, builders  # JAX only when results are collected.

  config = _config_with(config_path, overrides)
  return bench.train_flops_per_image(config, builders.num_classes(config))


def collect(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One row per evaluation (a run × sampler): variant, seed, (sampler,) costs, metrics.

  The FLOPs count is made once per variant (seeds share the model) and kept in the
  run's status file.
  """
  rows = []
  flops: dict[str, float] = {}
  for run in runs:
    evaluations = [e for e in run.evaluations if fileio.isfile(e.metrics_path)]
    if not evaluations:
      continue
    _, losses = loss_curve(run.workdir)
    status = _read_status(run)
    if 'train_flops_per_image' not in status:
      if run.variant not in flops:
        flops[run.variant] = train_flops_per_image(run.config, run.overrides)
      status['train_flops_per_image'] = flops[run.variant]
      _write_status(run, status)
    batch_size = _config_with(run.config, run.overrides).data.batch_size
    costs = {'train_seconds': round(status['train_seconds'], 1),
             'final_loss': float(losses[-1]) if len(losses) else float('nan'),
             'train_gflops_per_image': status['train_flops_per_image'] / 1e9,
             'train_img_per_s': train_images_per_second(run.workdir, batch_size)}
    for evaluation in evaluations:
      metrics = fileio.read_json(evaluation.metrics_path)
      row = {'variant': run.variant, 'seed': run.seed}
      if evaluation.sampler:
        row['sampler'] = evaluation.sampler
      row.update(costs)
      row.update({k: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
      rows.append(row)
  return rows


# Shown in the table but never ranked: costs, and losses that are not comparable
# across parameterizations (an eps loss and a v loss measure different targets).
INFO_COLUMNS = ('final_loss', 'train_gflops_per_image', 'train_img_per_s',
                'sampling_seconds_per_image', 'train_seconds', 'eval_seconds',
                'classifier_test_accuracy')


def _metric_columns(rows: Sequence[dict[str, Any]], *, info: bool = True) -> list[str]:
  """Result columns: metrics in a fixed order, then (with `info`) the info columns."""
  seen = []
  for row in rows:
    seen += [k for k in row if k not in seen]
  metrics = [k for k in seen if k not in ('variant', 'seed', 'sampler', 'step', 'num_samples')
             and not k.startswith('sample_') and not k.endswith('_real')
             and k not in INFO_COLUMNS]
  order = evaluation.REPORT_ORDER  # Sample quality, then the autoencoder's, then the rest.
  metrics.sort(key=lambda k: order.index(k) if k in order else len(order))
  return metrics + ([k for k in INFO_COLUMNS if k in seen] if info else [])


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  fields = []
  for row in rows:
    fields += [k for k in row if k not in fields]
  buffer = io.StringIO(newline='')
  writer = csv.DictWriter(buffer, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_atomic(path, buffer.getvalue())


def _key(row: dict[str, Any]) -> str:
  """A row's group over seeds: its variant, or 'variant/sampler' with samplers."""
  return f'{row["variant"]}/{row["sampler"]}' if row.get('sampler') else row['variant']


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
  """variant (or 'variant/sampler') -> metric -> (mean, std over seeds); std is 0 for one seed."""
  by_variant: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    by_variant.setdefault(_key(row), []).append(row)
  summary = {}
  for variant, variant_rows in by_variant.items():
    summary[variant] = {}
    for column in _metric_columns(rows):
      values = np.asarray([r[column] for r in variant_rows if column in r], np.float64)
      if len(values):
        summary[variant][column] = (float(values.mean()),
                                    float(values.std(ddof=1)) if len(values) > 1 else 0.0)
  return summary


def lower_is_better(metric: str) -> bool:
  return bool(_LOWER_IS_BETTER.search(metric))


def write_markdown(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Mean ± std per variant (and sampler); the best mean of each column in bold
  (among the rows of one sampler when there are several); real-vs-real last."""
  summary = summarize(rows)
  columns = _metric_columns(rows)
  sampler_of = {_key(r): r.get('sampler', '') for r in rows}
  variant_of = {_key(r): r['variant'] for r in rows}
  with_samplers = any(sampler_of.values())
  best: dict[tuple[str, str], str] = {}
  for column in _metric_columns(rows, info=False):
    for sampler in dict.fromkeys(sampler_of.values()):
      means = {k: s[column][0] for k, s in summary.items()
               if column in s and sampler_of[k] == sampler}
      if len(set(means.values())) > 1:  # A column where every variant ties has no best.
        pick = min if lower_is_better(column) else max
        best[column, sampler] = pick(means, key=means.get)
  seeds = sorted({r['seed'] for r in rows})
  runs = len({(r['variant'], r['seed']) for r in rows})
  within = ' among the rows of each sampler' if with_samplers else ''
  lead = ['variant', 'sampler'] if with_samplers else ['variant']
  lines = [f'# {title}', '',
           f'Mean ± std over seeds {seeds} ({runs} runs); best mean in bold{within} '
           f'(lower is better for FD/FID/KID, higher for the rest; '
           f'{", ".join(INFO_COLUMNS)} are not ranked).', '',
           '| ' + ' | '.join(lead + columns) + ' |',
           '|' + ' --- |' * (len(lead) + len(columns))]
  for key, stats in summary.items():
    cells = [variant_of[key]] + ([sampler_of[key]] if with_samplers else [])
    for column in columns:
      if column not in stats:
        cells.append('')
        continue
      mean, std = stats[column]
      cell = f'{mean:.4g} ± {std:.2g}'
      cells.append(f'**{cell}**' if best.get((column, sampler_of[key])) == key else cell)
    lines.append('| ' + ' | '.join(cells) + ' |')
  reals = {c: np.mean([r[f'{c}_real'] for r in rows if f'{c}_real' in r])
           for c in columns if any(f'{c}_real' in r for r in rows)}
  if reals:
    lines.append('| *real vs real* | ' + ('| ' if with_samplers else '') + ' | '.join(
        f'{reals[c]:.4g}' if c in reals else '' for c in columns) + ' |')
  fileio.write_atomic(path, '\n'.join(lines) + '\n')


def _save_figure(fig, path: str) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  fileio.write_atomic(path, buffer.getvalue())


def write_plots(runs: Sequence[Run], rows: Sequence[dict[str, Any]], directory: str) -> None:
  """loss_curves.png (per run, one colour per variant) and metrics.png (mean ± std bars)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  variants = list(dict.fromkeys(r.variant for r in runs))
  colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
  fig, ax = plt.subplots(figsize=(8, 5))
  for run in runs:
    steps, values = loss_curve(run.workdir)
    if len(steps):
      label = run.variant if run.seed == min(r.seed for r in runs if r.variant == run.variant) else None
      ax.plot(steps, values, color=colors[run.variant], alpha=0.8, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (stage 2)')
  ax.set_yscale('log')
  ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save_figure(fig, os.path.join(directory, 'loss_curves.png'))
  plt.close(fig)

  summary = summarize(rows)
  columns = _metric_columns(rows, info=False)
  ncols = min(4, max(1, len(columns)))
  nrows = -(-len(columns) // ncols) or 1
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
  for ax, column in zip(axes.flat, columns):
    names = [v for v in summary if column in summary[v]]
    means = [summary[v][column][0] for v in names]
    stds = [summary[v][column][1] for v in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3,
           color=[colors.get(v.split('/')[0]) for v in names])
    reals = [r[f'{column}_real'] for r in rows if f'{column}_real' in r]
    if reals:
      ax.axhline(float(np.mean(reals)), color='k', linestyle='--', linewidth=1, label='real')
    ax.set_title(column + (' ↓' if lower_is_better(column) else ' ↑'), fontsize='small')
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha='right', fontsize='x-small')
  for ax in list(axes.flat)[len(columns):]:
    ax.axis('off')
  fig.tight_layout()
  _save_figure(fig, os.path.join(directory, 'metrics.png'))
  plt.close(fig)


def write_results(runs: Sequence[Run], directory: str, title: str) -> list[dict[str, Any]]:
  rows = collect(runs)
  if not rows:
    raise UserError('no run has metrics yet; nothing to tabulate')
  fileio.makedirs(directory)
  write_csv(rows, os.path.join(directory, 'results.csv'))
  write_markdown(rows, os.path.join(directory, 'results.md'), title)
  if importlib.util.find_spec('matplotlib') is None:  # The optional `plot` extra.
    print("ablate: plots skipped, matplotlib is not installed (pip install -e '.[plot]')")
  else:
    write_plots(runs, rows, directory)
  return rows


# ------------------------------------------------------------------- main ----


def run_sweep(sweep_path: str, root: str, *, dry_run: bool = False, only: Sequence[str] = (),
              results_dir: str = '', seeds: Sequence[int] = (),
              samplers: Sequence[str] = ()) -> None:
  sweep = load_sweep(sweep_path)
  runs = plan(sweep, root, only, seeds, samplers)
  if dry_run:
    if sweep['share_autoencoder']:
      print(' '.join(autoencoder_command(sweep, root)))
    for run in runs:
      print(' && '.join(dry_run_commands(run)))
    return
  if sweep['share_autoencoder'] and not autoencoder_trained(sweep, root):
    _execute(autoencoder_command(sweep, root), os.path.join(root, 'autoencoder', 'ablate.log'))
  failures = []
  for i, run in enumerate(runs, 1):
    print(f'[{i}/{len(runs)}] {run.variant} seed {run.seed}: ', end='', flush=True)
    try:
      print(execute_run(run), flush=True)
    except UserError as e:  # Keep going: one broken variant should not stop the study.
      print(f'failed: {e}', flush=True)
      failures.append(run)
  title = os.path.splitext(os.path.basename(sweep_path))[0]
  directory = results_dir or root
  rows = write_results(runs, directory, title)
  print(f'results: {len(rows)} runs in {directory}/results.{{csv,md}}, loss_curves.png, '
        f'metrics.png')
  if failures:
    raise UserError(f'{len(failures)} run(s) failed: '
                    + ', '.join(f'{r.variant}/seed_{r.seed}' for r in failures))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
  if not FLAGS.sweep or not FLAGS.workdir:
    sys.exit('error: --sweep and --workdir are required')
  try:
    try:
      seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
      raise UserError(f'--seeds={",".join(FLAGS.seeds)}: accepted: integers, e.g. --seeds=0')
    run_sweep(FLAGS.sweep, FLAGS.workdir, dry_run=FLAGS.dry_run, only=FLAGS.only,
              results_dir=FLAGS.results_dir, seeds=seeds, samplers=FLAGS.samplers)
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
