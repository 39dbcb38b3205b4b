"""A word-level tokenizer whose vocabulary is built from a dataset's captions.

The LDM paper trains its text encoder from scratch on the captions it conditions
on; this tokenizer goes with that: lower-cased words (letters, digits and
apostrophes; everything else separates words), the most frequent
`vocab_size - len(SPECIAL_TOKENS)` words of the training captions, and

  [PAD] = 0   padding; the text encoder and the U-Net never attend to it,
  [CLS] = 1   first token of every caption, so even the empty caption (the null
              condition of classifier-free guidance) has one real position,
  [UNK] = 2   a word of an eval caption that the training captions lack.

A caption becomes [CLS] w1 w2 ... [PAD] ... of `max_length` ids; longer captions
are cut. The same rules exist as NumPy/Python (`Vocabulary.encode`, for prompts)
and TensorFlow (`Vocabulary.tf_encoder`, for the input pipeline).

The vocabulary is stored as a text file, one word per line, id = line number
(special tokens included), next to the checkpoints that depend on it.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Iterable

import numpy as np

from ldm_jax import fileio
from ldm_jax.errors import UserError

PAD, CLS, UNK = 0, 1, 2
SPECIAL_TOKENS = ('[PAD]', '[CLS]', '[UNK]')
_WORD = re.compile(r"[a-z0-9']+")
# The complement of _WORD's character class, for TensorFlow's RE2.
_SEPARATORS = r"[^a-z0-9']+"


def words(caption: str) -> list[str]:
  """The words of a caption: lower-cased runs of letters, digits and apostrophes."""
  return _WORD.findall(caption.lower())


class Vocabulary:
  """Word <-> id mapping; ids 0..2 are the special tokens.

  Attributes:
    tokens: every token, special ones first; a token's id is its position.
  """

  def __init__(self, tokens: Iterable[str]):
    self.tokens = tuple(tokens)
    if self.tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
      raise ValueError(f'a vocabulary starts with {SPECIAL_TOKENS}, got {self.tokens[:3]}')
    self._ids = {token: i for i, token in enumerate(self.tokens)}

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def words(self) -> tuple[str, ...]:
    """The vocabulary without the special tokens, in id order."""
    return self.tokens[len(SPECIAL_TOKENS):]

  @classmethod
  def build(cls, captions: Iterable[str], vocab_size: int) -> Vocabulary:
    """The `vocab_size - 3` most frequent words of `captions` (ties: alphabetical)."""
    if vocab_size <= len(SPECIAL_TOKENS):
      raise ValueError(f'vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}')
    counts = collections.Counter(w for caption in captions for w in words(caption))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return cls(SPECIAL_TOKENS + tuple(ranked[:vocab_size - len(SPECIAL_TOKENS)]))

  def save(self, path: str) -> None:
    """Writes one token per line (atomically: a temporary file, then a rename)."""
    fileio.write_atomic(path, '\n'.join(self.tokens) + '\n')

  @classmethod
  def load(cls, path: str) -> Vocabulary:
    return cls(line for line in fileio.read_text(path).split('\n') if line)

  def encode(self, caption: str, max_length: int, *, strict: bool = False) -> np.ndarray:
    """[max_length] int32 ids of [CLS] + the caption's words, padded with [PAD].

    Args:
      caption: any text.
      max_length: output length, [CLS] included; longer captions are cut.
      strict: raise `UserError` for an unknown word or a caption that does not fit
        (prompts), instead of [UNK] and cutting (dataset captions).

    Returns:
      [max_length] int32.
    """
    caption_words = words(caption)
    if strict:
      # Special tokens contain brackets, which separate words: no word is one.
      unknown = [w for w in caption_words if w not in self._ids]
      if unknown:
        raise UserError(f'unknown word(s) {", ".join(map(repr, unknown))} in {caption!r}; '
                        f'accepted words: {" ".join(sorted(self.words))}')
      if len(caption_words) + 1 > max_length:
        raise UserError(f'{caption!r} has {len(caption_words)} words; accepted: at most '
                        f'{max_length - 1} (max_length={max_length} counts [CLS])')
    ids = [CLS] + [self._ids.get(w, UNK) for w in caption_words]
    ids = ids[:max_length] + [PAD] * (max_length - len(ids))
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """The words of `ids`, special tokens left out."""
    return ' '.join(self.tokens[i] for i in ids if i >= len(SPECIAL_TOKENS))

  def tf_encoder(self, max_length: int):
    """A TensorFlow function: caption string [] -> [max_length] int32, as `encode`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Only the pipeline needs it.

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(self.words), tf.range(len(SPECIAL_TOKENS), len(self), dtype=tf.int32)),
        default_value=UNK)

    def encode(caption: tf.Tensor) -> tf.Tensor:
      text = tf.strings.regex_replace(tf.strings.lower(caption), _SEPARATORS, ' ')
      ids = table.lookup(tf.strings.split(tf.strings.strip(text)))
      ids = tf.concat([[CLS], ids], axis=0)[:max_length]
      ids = tf.pad(ids, [[0, max_length - tf.shape(ids)[0]]], constant_values=PAD)
      return tf.ensure_shape(ids, [max_length])

    return encode


def empty_caption(max_length: int) -> np.ndarray:
  """The null condition's tokens: [CLS] and padding."""
  return np.asarray([CLS] + [PAD] * (max_length - 1), np.int32)
