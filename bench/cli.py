"""The `advsweep` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from models import checkpoints, zoo


def _cmd_models(args: argparse.Namespace) -> int:
  """Lists the zoo: dataset, architecture, parameters, test accuracy, checkpoint size."""
  folder = Path(args.checkpoint_dir) if args.checkpoint_dir else zoo.CHECKPOINT_DIR
  header = ("model", "dataset", "architecture", "params", "test acc", "n test", "size",
            "note")
  rows = []
  for name, spec in zoo.ZOO.items():
    path = folder / spec.checkpoint.name
    if not path.is_file():
      rows.append((name, spec.dataset, spec.architecture, "-", "not trained", "-", "-",
                   f"run `advsweep train {name}`"))
      continue
    meta = checkpoints.load_meta(path)
    rows.append((name, spec.dataset, spec.architecture, f"{meta['parameters']:,}",
                 f"{100 * meta['test_accuracy']:.2f}%", f"{meta['test_examples']:,}",
                 f"{path.stat().st_size / 1e6:.2f} MB", spec.note))
  if args.markdown:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
      print("| " + " | ".join(str(c) for c in r) + " |")
    return 0
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
  return 0


def _cmd_train(args: argparse.Namespace) -> int:
  from models import train  # imported here: it pulls in optax and the data loaders

  result = train.train_and_evaluate(
      args.model, seed=args.seed, data_dir=args.data_dir, out_dir=args.out_dir,
      epochs=args.epochs, progress=not args.no_progress,
      command="advsweep " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
  meta = result.meta
  print(f"{args.model}: test accuracy {100 * meta['test_accuracy']:.2f}% on "
        f"{meta['test_examples']} images, {meta['parameters']:,} parameters, "
        f"{meta['train_seconds']:.0f} s of training")
  if args.out_dir:
    print(f"wrote {Path(args.out_dir) / (args.model + '.msgpack')} (sha256 {meta['sha256']})")
  return 0


def _cmd_attack(args: argparse.Namespace) -> int:
  from bench import run_attack

  try:
    run = run_attack.run_attack(args.model, args.attack, args.num_images, seed=args.seed,
                                overrides=args.set, data_dir=args.data_dir)
  except ValueError as err:
    print(f"advsweep attack: error: {err}", file=sys.stderr)
    return 2
  print(run_attack.format_summary(run))
  return 0


def _cmd_perf(args: argparse.Namespace) -> int:
  from bench import perf

  return perf.main(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="advsweep", description="JAX benchmark suite for adversarial attacks.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("models", help="list the model zoo with accuracy and size")
  p.add_argument("--checkpoint-dir", default=None,
                 help="folder of checkpoints (default: the shipped zoo)")
  p.add_argument("--markdown", action="store_true", help="print a Markdown table")
  p.set_defaults(func=_cmd_models)

  p = sub.add_parser("train", help="train a zoo model with its recipe")
  p.add_argument("model", choices=list(zoo.ZOO), metavar="MODEL",
                 help="one of: " + ", ".join(zoo.ZOO))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"),
                 help="local data folder (default: $ADVSWEEP_DATA_DIR)")
  p.add_argument("--out-dir", default=str(zoo.CHECKPOINT_DIR),
                 help="where to write <model>.msgpack and .json (default: the zoo)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_cmd_train)

  import attacks  # the registry names the attacks

  p = sub.add_parser("attack", help="run one attack on a zoo model's first N test images")
  p.add_argument("model", choices=list(zoo.ZOO), metavar="MODEL",
                 help="one of: " + ", ".join(zoo.ZOO))
  p.add_argument("attack", choices=list(attacks.REGISTRY), metavar="ATTACK",
                 help="one of: " + ", ".join(attacks.REGISTRY))
  p.add_argument("-n", "--num-images", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set eps=0.1 (repeatable)")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.set_defaults(func=_cmd_attack)

  p = sub.add_parser("perf", help="attack throughput against the model's raw throughput")
  p.add_argument("--models", nargs="+", default=None,
                 help="zoo models (default: mnist_lenet and a shipped CIFAR-10 model)")
  p.add_argument("--attacks", nargs="+", default=None, choices=list(attacks.REGISTRY))
  p.add_argument("-n", "--num-images", type=int, default=32)
  p.add_argument("--quick", action="store_true",
                 help="small budgets (few generations and steps): a smoke run in a minute")
  p.add_argument("--out", default="results/perf", help="folder for the parquet file")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.set_defaults(func=_cmd_perf)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
