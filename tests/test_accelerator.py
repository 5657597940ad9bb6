"""The accelerator script's steps are commands the CLI takes (the script itself runs on a
device, or as a CPU smoke run with --quick: `python -m advsweep.bench.perf.accelerator --quick`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advsweep.bench import cli
from advsweep.bench.perf import accelerator


@pytest.mark.parametrize("quick", [True, False])
def test_every_step_is_a_command_the_cli_takes(quick):
  parser = cli.build_parser()
  commands = accelerator.steps(quick, Path("out"))
  assert [name for name, _ in commands] == ["perf --quick", "one-pixel vs ART",
                                            "standard evaluation", "reproduce su2019"]
  for _, argv in commands:
    args = parser.parse_args([*argv, "--no-compile-cache"])
    assert args.no_compile_cache
  standard = parser.parse_args(commands[2][1])
  assert standard.standard and standard.num_images == (20 if quick else 1000)
  assert parser.parse_args(commands[3][1]).quick == quick
