"""The machine a bench table was measured on, named the same way in every table: CPU model,
family/model numbers, cores, SIMD width and the bf16 flags that decide model.dtype='auto'."""
from __future__ import annotations

import os
import platform
import re


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'

  def field(name):
    m = re.search(rf'^{name}\s*:\s*(.*)$', info, re.MULTILINE)
    return m.group(1).strip() if m else ''

  flags = set(field('flags').split())
  simd = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'
  bf16 = [f for f in ('avx512_bf16', 'amx_bf16') if f in flags]
  return (f'{field("model name") or "unknown CPU"} (family {field("cpu family")} model '
          f'{field("model")}), {os.cpu_count()} cores, {simd}, '
          f'{"+".join(bf16) if bf16 else "no avx512_bf16/amx_bf16"}')


if __name__ == '__main__':
  print(cpu_name())
