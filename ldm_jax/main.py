"""Entry point: `python -m ldm_jax.main --config=configs/default.py --workdir=DIR`.

Rerunning the same command resumes from the latest checkpoints.
"""
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import checkpointing, logs, modes, observe, preemption, sharding
from ldm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and samples. Re-running resumes.')
flags.DEFINE_enum('mode', 'train', list(modes.MODES),
                  'train: stage 1, stage 2, then samples. train_autoencoder: stage 1 only. '
                  'sample: samples from the latest checkpoint. eval: sample and reconstruction '
                  'metrics of the latest checkpoint. edit: inpainting or img2img of '
                  'config.edit.input. encode: cache the train split\'s latents in '
                  'WORKDIR/latents. merge_lora: LoRA adapters merged into their base, '
                  'as WORKDIR/merged_unet. A Stable Diffusion config '
                  '(configs/stable_diffusion.py) takes train, sample, edit and merge_lora.')
flags.DEFINE_integer('num_samples', None, 'Samples to write in --mode=sample '
                     '(default: config.sample.num_samples).')
flags.DEFINE_multi_string('prompt', None, 'Text prompts for --mode=sample with a '
                          'text-conditioned config, one grid row each; may be repeated. '
                          '--mode=edit takes one, the text the edit is conditioned on.')
flags.DEFINE_multi_string('negative_prompt', None, 'With a Stable Diffusion config: what '
                          'guidance steers away from, one for all prompts or one per --prompt.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 of a multi-process '
                    'run started by hand (TPU pods and SLURM are detected without flags).')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

def _one_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def _unknown_field_message(error: BaseException, argv: list[str]) -> str:
  """One line for an override of a field the config does not have."""
  text = str(error).encode().decode('unicode_escape')
  key = re.search(r"'([^']+)'", text)
  key = key.group(1) if key else text
  culprit = next((a for a in argv if a.startswith('--config.') and
                  re.search(rf'[.]{re.escape(key)}(=|$)', a)), 'a --config. flag')
  hint = re.search(r'Did you mean "([^"]+)"', text)
  hint = f'; did you mean {hint.group(1)!r}?' if hint else ''
  return f'error: unknown config field {key!r} in {culprit}{hint}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that ends a bad flag or config override with one line, not a traceback."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises its error here.
  except (AttributeError, KeyError) as e:
    sys.exit(_unknown_field_message(e, argv))
  except flags.Error as e:
    sys.exit(f'error: {_one_line(e)}')
  except Exception as e:  # The config file: missing, or Python that fails.
    while e.__cause__ is not None:
      e = e.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')
    sys.exit(f'error: cannot load --config={path}: '
             f'{lines[-1] if lines else type(e).__name__}')
  return remaining


def options_from_flags() -> modes.Options:
  """The mode options the parsed command-line flags give."""
  return modes.Options(num_samples=FLAGS.num_samples,
                       prompts=tuple(FLAGS.prompt) if FLAGS.prompt else None,
                       negative_prompts=(tuple(FLAGS.negative_prompt)
                                         if FLAGS.negative_prompt else None))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}; flags look like --name=value')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(logs.quiet_libraries)
  try:
    # Before any other use of JAX: the device list then spans all processes.
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    if jax.process_index() != 0:
      logging.set_verbosity(logging.WARNING)  # One log per run, from process 0.
    observe.enable_compilation_cache(FLAGS.config, FLAGS.workdir)
    modes.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, options_from_flags())
  except UserError as e:
    _exit_with_error(f'error: {_one_line(e)}')
  except preemption.Preempted as e:
    if jax.process_index() == 0:
      print(e)
    sys.exit(0)


def _exit_with_error(message: str) -> None:
  """Awaits pending checkpoint saves, prints `message`, and exits 1 with nothing after it."""
  checkpointing.wait_all()
  if jax.distributed.is_initialized():
    sys.exit(message)  # The processes shut the distributed runtime down together.
  print(message, file=sys.stderr, flush=True)
  logging.flush()
  sys.stdout.flush()
  # Library threads and atexit hooks (orbax's event loop, a failed save's waiters)
  # would print tracebacks after the error line, or wait: end here.
  os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
