"""The `RESULT key=value ...` lines the benchmarks print, read back (standard library only)."""
import re

_PAIR = re.compile(r'(\w+)=([-+0-9.eE]+|nan|inf)(?=\s|$)')


def parse_result(output: str, prefix: str = 'RESULT') -> dict[str, float]:
  """The `key=value` numbers of the last line of `output` that starts with `prefix`.

  Args:
    output: a benchmark's printed text.
    prefix: the first word of the line, e.g. 'RESULT' or 'MEMORY'.

  Returns:
    {key: value}; empty when no line starts with `prefix`.
  """
  lines = [line for line in output.splitlines() if line.startswith(prefix + ' ')]
  if not lines:
    return {}
  return {k: float(v) for k, v in _PAIR.findall(lines[-1])}
