"""XLA:CPU settings advsweep applies by default: the fast path without a flag to remember.

Importing this module applies them (`advsweep.attacks` imports it before anything else, and
`advsweep.models` imports that). XLA reads `XLA_FLAGS` once, when JAX starts its backend (the
first computation, which importing a library such as evosax can run), so they take effect
only if `advsweep` is imported before any JAX computation runs; a user's own `XLA_FLAGS`
that names the same setting wins, and `ADVSWEEP_XLA_DEFAULTS=0` turns them off.

- YNNPACK's individual-convolution fusion off: on jaxlib 0.10 it routes some of the zoo's
  convolutions (3x3, 32 channels in and out, on 24 x 24 maps) to a kernel several times
  slower than XLA's own, in every forward and gradient pass (`advsweep perf` measures it).

The flag is set only for the jaxlib versions it was measured on: XLA refuses to start on a
flag it does not know, and experimental flags come and go between versions.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from importlib import metadata

YNN_CONVOLUTION_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib (major, minor) releases whose XLA knows the flag and was measured with it.
MEASURED_JAXLIB = ((0, 10),)
OPT_OUT = "ADVSWEEP_XLA_DEFAULTS"


def _jaxlib_release() -> tuple[int, int] | None:
  try:
    major, minor = metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except (metadata.PackageNotFoundError, ValueError):
    return None


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   jaxlib_release: tuple[int, int] | None = None) -> bool:
  """Adds advsweep's XLA:CPU flags to `environ` (default `os.environ`) where the user set
  nothing of the same name and the installed jaxlib is one they were measured on; returns
  whether it added them."""
  environ = os.environ if environ is None else environ
  release = _jaxlib_release() if jaxlib_release is None else jaxlib_release
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT, "1") == "0" or release not in MEASURED_JAXLIB:
    return False
  if "ynn_fusion_type" in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {YNN_CONVOLUTION_OFF}".strip()
  return True


apply_defaults()
