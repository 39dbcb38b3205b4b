"""CLIP's byte-level BPE tokenizer from a Stable Diffusion `tokenizer/` folder.

Built on Hugging Face `tokenizers` with the pipeline of transformers' `CLIPTokenizer`
(NFC, whitespace runs to one space, lower case; CLIP's word regex; byte-level
symbols; BPE with the `</w>` end-of-word suffix; <|startoftext|> ... <|endoftext|>
around every prompt), so that token ids equal transformers' on the same files.
Prompts are truncated to `model_max_length` (77) tokens, ends included, and padded
with the folder's `pad_token` (<|endoftext|> in SD 1.x, "!" in SD 2.x).
"""
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ldm_jax import fileio
from ldm_jax.errors import UserError

FILES = ('vocab.json', 'merges.txt')
CONFIG_FILE = 'tokenizer_config.json'
# transformers' CLIPTokenizer defaults (used when tokenizer_config.json omits them).
DEFAULTS = dict(bos_token='<|startoftext|>', eos_token='<|endoftext|>',
                unk_token='<|endoftext|>', pad_token='<|endoftext|>', model_max_length=77)
_WORDS = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
          r"""[^\s\p{L}\p{N}]+""")


def _token(value) -> str:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  return value['content'] if isinstance(value, dict) else str(value)


class CLIPTokenizer:
  """Prompts -> [B, model_max_length] int32 token ids.

  Attributes:
    model_max_length: tokens per prompt after padding / truncation (77).
    pad_token_id, bos_token_id, eos_token_id: the special ids.
    config: the folder's tokenizer settings, written back by `save`.
  """

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
               config: dict, source: str):
    self.vocab, self.merges, self.config = vocab, merges, config
    ids = {}
    for key in ('bos_token', 'eos_token', 'unk_token', 'pad_token'):
      token = _token(config[key])
      if token not in vocab:
        raise UserError(f'{source}: {key} {token!r} is not in vocab.json')
      ids[key] = vocab[token]
    self.bos_token_id, self.eos_token_id = ids['bos_token'], ids['eos_token']
    self.pad_token_id = ids['pad_token']
    self.model_max_length = int(config['model_max_length'])
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None,
                              continuing_subword_prefix='', end_of_word_suffix='</w>',
                              fuse_unk=False, unk_token=_token(config['unk_token'])))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORDS), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bos, eos = _token(config['bos_token']), _token(config['eos_token'])
    # As transformers does: every special token, the pad token too, is matched whole
    # before BPE (so SD 2's "!" pad token splits "!!" into two "!" tokens).
    tokenizer.add_special_tokens(list(dict.fromkeys(
        _token(config[key]) for key in ('bos_token', 'eos_token', 'unk_token', 'pad_token'))))
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, self.eos_token_id), (bos, self.bos_token_id), trim_offsets=False,
        add_prefix_space=False)
    tokenizer.enable_truncation(self.model_max_length)
    tokenizer.enable_padding(length=self.model_max_length, pad_id=self.pad_token_id,
                             pad_token=_token(config['pad_token']))
    self._tokenizer = tokenizer

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """Token ids [B, model_max_length] int32; longer prompts are truncated with a warning."""
    if isinstance(prompts, str):
      prompts = [prompts]
    encodings = self._tokenizer.encode_batch(list(prompts))
    long = [p for p, e in zip(prompts, encodings) if e.overflowing]
    if long:
      first = long[0] if len(long[0]) <= 60 else long[0][:57] + '...'
      more = f' (and {len(long) - 1} more)' if len(long) > 1 else ''
      logging.warning('prompt %r%s is longer than %d tokens; truncated', first, more,
                      self.model_max_length)
    return np.asarray([e.ids for e in encodings], np.int32)

  def save(self, path: str) -> None:
    """Writes vocab.json, merges.txt and tokenizer_config.json under `path`."""
    fileio.write_atomic(os.path.join(path, 'vocab.json'),
                        json.dumps(self.vocab, ensure_ascii=False).encode('utf-8'))
    fileio.write_atomic(os.path.join(path, 'merges.txt'), (
        '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in self.merges)).encode('utf-8'))
    fileio.write_atomic(os.path.join(path, CONFIG_FILE),
                        json.dumps(self.config, indent=2, ensure_ascii=False).encode('utf-8'))


def _read_utf8(file: str) -> str:
  with fileio.open(file, 'rb') as f:
    return f.read().decode('utf-8')


def load(path: str) -> CLIPTokenizer:
  """The tokenizer of a Stable Diffusion `tokenizer/` folder (vocab.json, merges.txt)."""
  for file in FILES:
    if not fileio.isfile(os.path.join(path, file)):
      raise UserError(f'{path!r} has no {file}; a CLIP tokenizer folder holds '
                      f'{" and ".join(FILES)}')
  try:
    vocab = json.loads(_read_utf8(os.path.join(path, 'vocab.json')))
    lines = _read_utf8(os.path.join(path, 'merges.txt')).split('\n')
  except (*fileio.ERRORS, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read the tokenizer in {path!r}: {e}') from e
  if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
    raise UserError(f'{os.path.join(path, "vocab.json")} is not a token -> id map')
  merges = []
  for line in lines:
    if line.startswith('#version') or not line.strip():
      continue
    parts = line.split(' ')
    if len(parts) != 2:
      raise UserError(f'{os.path.join(path, "merges.txt")}: bad merge line {line!r}')
    merges.append((parts[0], parts[1]))
  config = dict(DEFAULTS)
  config_file = os.path.join(path, CONFIG_FILE)
  if fileio.isfile(config_file):
    try:
      saved = json.loads(_read_utf8(config_file))
    except (*fileio.ERRORS, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f'cannot read {config_file}: {e}') from e
    config.update({k: saved[k] for k in DEFAULTS if saved.get(k) is not None})
  # Older folders set an effectively infinite model_max_length; CLIP has 77 positions.
  if int(config['model_max_length']) > 10**6:
    config['model_max_length'] = DEFAULTS['model_max_length']
  config = {k: _token(v) if k.endswith('_token') else int(v) for k, v in config.items()}
  return CLIPTokenizer(vocab, merges, config, path)
