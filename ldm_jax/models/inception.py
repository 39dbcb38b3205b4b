"""The FID InceptionV3 (2015-12-05 TensorFlow graph) in Flax, and its weight loader.

Every published FID uses this network: the TF-slim Inception of 2015-12-05, as
ported to PyTorch by pytorch-fid (`fid_inception_v3`, with its FID-specific blocks
`FIDInceptionA/C/E_1/E_2`: average pools that do not count padding, and a max pool
in the last block). Inputs are bilinearly resized to 299x299; the 2048-d output
is the average of the last feature map (pool3).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch zip
checkpoint, read here without torch), or the same state dict saved as `.npz` or
`.safetensors`. Submodules carry the PyTorch names (`Mixed_5b/branch5x5_1/conv`),
so the mapping is a renaming plus kernel transposition.
"""
import collections
import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import fileio
from ldm_jax.errors import UserError

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
# The sha256 of pytorch-fid's file starts with the 8 digits in its name.
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_SHA256_PREFIX = '6726825d'


class BasicConv(nn.Module):
  """Conv (no bias) -> frozen batch norm -> ReLU, as torchvision's `BasicConv2d`."""

  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel_size), strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name='conv',
                precision=jax.lax.Precision.HIGHEST)(x)
    bn = FrozenBatchNorm(name='bn')
    return nn.relu(bn(x))


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, shape)
    bias = self.param('bias', nn.initializers.zeros, shape)
    mean = self.param('mean', nn.initializers.zeros, shape)
    var = self.param('var', nn.initializers.ones, shape)
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPSILON)) + bias


def _conv(name: str, features: int, kernel, strides: int = 1, padding=(0, 0)) -> BasicConv:
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return BasicConv(features, kernel, strides, padding, name=name)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # The TF graph averages only over the pixels inside the image.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv('branch1x1', 64, 1)(x)
    b5 = _conv('branch5x5_2', 64, 5, padding=2)(_conv('branch5x5_1', 48, 1)(x))
    b3 = _conv('branch3x3dbl_1', 64, 1)(x)
    b3 = _conv('branch3x3dbl_3', 96, 3, padding=1)(_conv('branch3x3dbl_2', 96, 3, padding=1)(b3))
    bp = _conv('branch_pool', self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv('branch3x3', 384, 3, strides=2)(x)
    bd = _conv('branch3x3dbl_1', 64, 1)(x)
    bd = _conv('branch3x3dbl_2', 96, 3, padding=1)(bd)
    bd = _conv('branch3x3dbl_3', 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv('branch1x1', 192, 1)(x)
    b7 = _conv('branch7x7_1', c7, 1)(x)
    b7 = _conv('branch7x7_2', c7, (1, 7), padding=(0, 3))(b7)
    b7 = _conv('branch7x7_3', 192, (7, 1), padding=(3, 0))(b7)
    bd = _conv('branch7x7dbl_1', c7, 1)(x)
    bd = _conv('branch7x7dbl_2', c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv('branch7x7dbl_3', c7, (1, 7), padding=(0, 3))(bd)
    bd = _conv('branch7x7dbl_4', c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv('branch7x7dbl_5', 192, (1, 7), padding=(0, 3))(bd)
    bp = _conv('branch_pool', 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv('branch3x3_2', 320, 3, strides=2)(_conv('branch3x3_1', 192, 1)(x))
    b7 = _conv('branch7x7x3_1', 192, 1)(x)
    b7 = _conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = _conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = _conv('branch7x7x3_4', 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """The last blocks; the FID graph max-pools in the second one (`Mixed_7c`)."""

  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = _conv('branch1x1', 320, 1)(x)
    b3 = _conv('branch3x3_1', 384, 1)(x)
    b3 = jnp.concatenate([_conv('branch3x3_2a', 384, (1, 3), padding=(0, 1))(b3),
                          _conv('branch3x3_2b', 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = _conv('branch3x3dbl_1', 448, 1)(x)
    bd = _conv('branch3x3dbl_2', 384, 3, padding=1)(bd)
    bd = jnp.concatenate([_conv('branch3x3dbl_3a', 384, (1, 3), padding=(0, 1))(bd),
                          _conv('branch3x3dbl_3b', 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = _conv('branch_pool', 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images [B, H, W, 1 or 3] in [-1, 1] -> pool3 features [B, 2048]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.tile(x, (1, 1, 1, 3))
    # Bilinear with half-pixel centres and no antialiasing, as torch's
    # interpolate(mode='bilinear', align_corners=False).
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), 'bilinear',
                         antialias=False)
    x = _conv('Conv2d_1a_3x3', 32, 3, strides=2)(x)
    x = _conv('Conv2d_2a_3x3', 32, 3)(x)
    x = _conv('Conv2d_2b_3x3', 64, 3, padding=1)(x)
    x = _max_pool_3x3_stride2(x)
    x = _conv('Conv2d_3b_1x1', 80, 1)(x)
    x = _conv('Conv2d_4a_3x3', 192, 3)(x)
    x = _max_pool_3x3_stride2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


# ------------------------------------------------------------------ weights ---

# State-dict entries that the feature extractor does not use.
_UNUSED_PREFIXES = ('fc.', 'AuxLogits.')
_UNUSED_SUFFIXES = ('.num_batches_tracked',)
_BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def abstract_params() -> dict:
  """Shapes of the Flax parameters (no computation)."""
  model = FIDInceptionV3()
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))['params']


def torch_name(path: tuple[str, ...]) -> str:
  """State-dict name of a Flax parameter path, e.g. ('Mixed_5b', 'branch1x1', 'conv', 'kernel')."""
  *modules, layer, leaf = path
  suffix = 'weight' if layer == 'conv' else _BN_NAMES[leaf]
  return '.'.join([*modules, layer, suffix])


def params_from_state_dict(state_dict: dict[str, np.ndarray], source: str = 'state dict') -> dict:
  """Maps a pytorch-fid state dict onto `FIDInceptionV3` parameters.

  Conv kernels go from OIHW to HWIO; batch-norm weight/bias/running stats become
  scale/bias/mean/var.

  Raises:
    UserError: a tensor is missing, unknown, or has the wrong shape; the message
      names it.
  """
  flat = jax.tree_util.tree_flatten_with_path(abstract_params())[0]
  params, expected_names = {}, set()
  for key_path, leaf in flat:
    path = tuple(k.key for k in key_path)
    name = torch_name(path)
    expected_names.add(name)
    if name not in state_dict:
      raise UserError(f'Inception weights {source}: tensor {name!r} is missing')
    value = np.asarray(state_dict[name], np.float32)
    if path[-1] == 'kernel':
      want = (leaf.shape[3], leaf.shape[2], leaf.shape[0], leaf.shape[1])
      if value.shape != want:
        raise UserError(f'Inception weights {source}: tensor {name!r} has shape '
                        f'{value.shape}; expected {want}')
      value = value.transpose(2, 3, 1, 0)
    elif value.shape != leaf.shape:
      raise UserError(f'Inception weights {source}: tensor {name!r} has shape {value.shape}; '
                      f'expected {leaf.shape}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  for name in sorted(state_dict):
    if (name not in expected_names and not name.startswith(_UNUSED_PREFIXES)
        and not name.endswith(_UNUSED_SUFFIXES)):
      raise UserError(f'Inception weights {source}: unknown tensor {name!r}; expected the '
                      f'state dict of pytorch-fid\'s FID InceptionV3')
  return params


# ----------------------------------------------------------- file formats ---

_TORCH_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


class _StorageType:
  def __init__(self, name: str):
    self.dtype = _TORCH_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=[s * itemsize for s in stride]).copy()


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds a torch state dict as NumPy arrays; allows nothing else to be constructed."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module: str, name: str):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor
    if module == 'torch' and name in _TORCH_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a weights file')

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, number of elements)
    _, storage_type, key, _, numel = pid
    data = self._archive.read(f'{self._prefix}data/{key}')
    return np.frombuffer(data, storage_type.dtype, count=numel)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _PendingTensor:
  def __init__(self, args: tuple):
    self.args = args


def _read_legacy_torch(f: io.BytesIO, path: str, label: str) -> dict:
  """Reads the pre-1.6 `torch.save` format: pickles followed by the raw storages.

  The file holds the magic number, protocol version and system info pickles, the
  object pickle (storages as persistent ids), the sorted storage keys, then for each
  key an int64 element count and the little-endian bytes.
  """
  with f:
    try:
      if pickle.load(f) != _LEGACY_MAGIC:
        raise UserError(f'{label} {path}: not a torch checkpoint')
      pickle.load(f)  # Protocol version.
      pickle.load(f)  # System info.
      storages: dict[str, tuple[type, list]] = {}

      class Unpickler(_TorchUnpickler):
        # Storages are read after the object pickle: tensors are built once they are.
        def find_class(self, module: str, name: str):
          if module == 'torch._utils' and name == '_rebuild_tensor_v2':
            return lambda *args: _PendingTensor(args)
          return super().find_class(module, name)

        def persistent_load(self, pid):
          # ('storage', storage type, key, location, number of elements, view metadata)
          _, storage_type, key, _, numel, view = pid
          if view is not None:
            raise pickle.UnpicklingError('storage views are not supported')
          array = np.empty(numel, storage_type.dtype)
          storages[key] = array
          return array

      obj = Unpickler(f, None, '').load()
      for key in pickle.load(f):
        count = int.from_bytes(f.read(8), 'little')
        array = storages[key]
        data = f.read(count * array.dtype.itemsize)
        if count != array.size or len(data) != array.nbytes:
          raise UserError(f'{label} {path}: truncated storage {key}')
        array[:] = np.frombuffer(data, array.dtype)
      if isinstance(obj, dict):
        obj = {k: _rebuild_tensor(*v.args) if isinstance(v, _PendingTensor) else v
               for k, v in obj.items()}
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
      raise UserError(f'{label} {path}: cannot read: {e}') from e
  return obj


def read_torch_state_dict(path: str, label: str = 'Inception weights') -> dict[str, np.ndarray]:
  """Reads a tensor state dict saved by `torch.save` (zip or legacy format) without torch.

  Args:
    path: the file.
    label: names the file's role in error messages.
  """
  with fileio.open(path, 'rb') as f:
    source = io.BytesIO(f.read())  # Remote files cannot be seeked cheaply.
  if zipfile.is_zipfile(source):
    with zipfile.ZipFile(source) as archive:
      pickles = [n for n in archive.namelist() if n.endswith('data.pkl')]
      if not pickles:
        raise UserError(f'{label} {path}: no data.pkl in the archive')
      prefix = pickles[0][:-len('data.pkl')]
      try:
        state_dict = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()
      except (pickle.UnpicklingError, KeyError, ValueError) as e:
        raise UserError(f'{label} {path}: cannot read: {e}') from e
  else:
    source.seek(0)
    if source.read(2) != b'\x80\x02':  # Pickle protocol 2: the legacy format's header.
      raise UserError(f'{label} {path}: not a torch zip checkpoint (nor the legacy format); '
                      f'accepted: .pth from torch.save, .npz or .safetensors')
    source.seek(0)
    state_dict = _read_legacy_torch(source, path, label)
  if not isinstance(state_dict, dict):
    raise UserError(f'{label} {path}: holds a {type(state_dict).__name__}, not a state dict')
  return dict(state_dict)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file (8-byte header length, JSON header, raw data)."""
  with fileio.open(path, 'rb') as f:
    header_size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(header_size))
    data = f.read()
  arrays = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    if entry['dtype'] not in _SAFETENSORS_DTYPES:
      raise UserError(f'Inception weights {path}: tensor {name!r} has unsupported dtype '
                      f'{entry["dtype"]}')
    start, end = entry['data_offsets']
    arrays[name] = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[entry['dtype']]).reshape(
        entry['shape'])
  return arrays


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from a .pth (torch zip), .npz or .safetensors file."""
  if not fileio.isfile(path):
    raise UserError(f'config.eval.inception_weights={path!r}: no such file; download '
                    f'{WEIGHTS_FILE} (see README, Evaluation)')
  if path.endswith('.npz'):
    return fileio.load_npz(path)
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  return read_torch_state_dict(path)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with fileio.open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def load_inception(path: str) -> tuple[FIDInceptionV3, dict]:
  """The FID network and its parameters from `path`.

  A file named like pytorch-fid's must have its checksum: a truncated download
  would otherwise give silently wrong FIDs.

  Raises:
    UserError: missing file, wrong checksum, unreadable format or a bad tensor.
  """
  state_dict = read_state_dict(path)
  if os.path.basename(path) == WEIGHTS_FILE:
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
      raise UserError(f'Inception weights {path}: sha256 {digest[:16]}... does not start '
                      f'with {WEIGHTS_SHA256_PREFIX}; the download is corrupt, fetch it again')
  return FIDInceptionV3(), params_from_state_dict(state_dict, path)
