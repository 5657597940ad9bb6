"""The `advsweep` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import typing
from pathlib import Path


def _interrupted_while_starting(signum: int, frame: object) -> None:
  sys.stderr.write("advsweep: interrupted while starting; nothing was written\n")
  os._exit(130)


# Ctrl-C during the imports below (JAX takes seconds) is one line too; `main` restores
# Python's KeyboardInterrupt once the commands can handle it. Only when this module starts
# the `advsweep` command: a program that imports it keeps its own Ctrl-C.
_STARTING = __name__ == "__main__" or Path(sys.argv[0] if sys.argv else "").name == "advsweep"
if _STARTING and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, _interrupted_while_starting)

from advsweep.bench.reports import tables  # noqa: E402
from advsweep.models import checkpoints, interrupts, zoo  # noqa: E402


def _cmd_init(args: argparse.Namespace) -> int:
  from advsweep.bench.driver import starter

  path = starter.write(args.model, Path(args.out), dataset=args.dataset, force=args.force)
  print(f"wrote {path}; run it with: advsweep run {path}")
  return 0


def _cmd_models(args: argparse.Namespace) -> int:
  """Lists the zoo: dataset, architecture, parameters, test accuracy, checkpoint size. Every
  checkpoint listed is verified (sha256 and structure) as `models.load` verifies it; exit 1
  when one fails."""
  folder = Path(args.checkpoint_dir) if args.checkpoint_dir else zoo.CHECKPOINT_DIR
  if not folder.is_dir():
    raise checkpoints.CheckpointError(
        f"no checkpoint folder {folder}; pass --checkpoint-dir a folder holding "
        "<model>.msgpack and <model>.json files (`advsweep train NAME --out-dir DIR` writes "
        "them)")
  from advsweep.bench.reports import zoo as zoo_table

  rows, failures = zoo_table.rows(folder)
  header = zoo_table.HEADER
  print(tables.format_markdown(header, rows) if args.markdown
        else tables.format_text(header, rows))
  for failure in failures:
    print(f"advsweep models: error: {failure}", file=sys.stderr)
  return 1 if failures else 0


def _train_command(args: argparse.Namespace) -> str:
  """The command that trains these weights again, for the metadata: the arguments that
  decide them, not the folders of the machine that ran it (which a shipped checkpoint would
  otherwise carry to every user)."""
  words = ["advsweep", "train", args.model, "--seed", str(args.seed)]
  if args.epochs is not None:
    words += ["--epochs", str(args.epochs)]
  return " ".join(shlex.quote(w) for w in words)


def _cmd_train(args: argparse.Namespace) -> int:
  from advsweep.models import training  # imported here: it pulls in optax and the data loaders

  result = training.train_and_evaluate(
      args.model, seed=args.seed, data_dir=args.data_dir, out_dir=args.out_dir,
      epochs=args.epochs, progress=not args.no_progress, restart=args.restart,
      command=_train_command(args), keep_epochs=args.keep_epochs)
  meta = result.meta
  print(f"{args.model}: test accuracy {100 * meta['test_accuracy']:.2f}% on "
        f"{meta['test_examples']} images, {meta['parameters']:,} parameters, "
        f"{meta['train_seconds']:.0f} s of training")
  if args.out_dir:
    print(f"wrote {Path(args.out_dir) / (args.model + '.msgpack')} (sha256 {meta['sha256']})")
  return 0


def _cmd_gan(args: argparse.Namespace) -> int:
  from advsweep.bench import gan

  if args.kind == "dcgan":
    out = Path(args.out) if args.out else (zoo.CHECKPOINT_DIR / "gan" / f"dcgan_{args.dataset}"
                                           ".msgpack")
    meta = gan.train_dcgan(args.dataset, out, epochs=args.epochs, seed=args.seed,
                           data_dir=args.data_dir, train_limit=args.train_limit,
                           progress=not args.no_progress)
    q = meta["quality"]
    print(f"DCGAN on {args.dataset}: {meta['train_seconds']:.0f} s of training; "
          f"{q['judge']} classifies {100 * q['class_accuracy']:.1f}% of {q['samples']} "
          f"samples as the class asked for; Frechet distance {q['frechet_distance']:.2f} "
          f"(real train vs test images: {q['frechet_distance_real_train_vs_test']:.2f})")
    print(f"wrote {out} (sha256 {meta['sha256']})")
    return 0
  if args.model is None:
    raise ValueError("advsweep gan advgan needs the MODEL to train the generator against")
  meta = gan.train_advgan(args.model, eps=args.eps, targeted=args.targeted,
                          epochs=args.epochs, kappa=args.kappa, seed=args.seed,
                          data_dir=args.data_dir, out_dir=Path(args.out) if args.out else None,
                          checkpoint_dir=args.checkpoint_dir, train_limit=args.train_limit,
                          progress=not args.no_progress)
  print(f"AdvGAN generator against {args.model} (eps {args.eps:g}, "
        f"{'targeted' if args.targeted else 'untargeted'}): {meta['train_seconds']:.0f} s of "
        f"training; success {100 * meta['eval_success_rate']:.1f}% on the "
        f"{meta['eval_clean_correct']} correctly classified of the first "
        f"{meta['eval_images']} test images")
  print(f"wrote {meta['path']} (sha256 {meta['sha256']})")
  return 0


def _cmd_attack(args: argparse.Namespace) -> int:
  from advsweep.bench.driver import run_attack

  run = run_attack.run_attack(args.model, args.attack, args.num_images, seed=args.seed,
                              overrides=args.set, data_dir=args.data_dir,
                              checkpoint_dir=args.checkpoint_dir)
  print(run_attack.format_summary(run))
  return 0


PERF_PROGRAMS = ("throughput", "peers", "scaling")
# Options that belong to one program only: given to another, they are refused by name.
_PERF_ONLY = {"pixel_images": ("--pixel-images", "peers"), "sweeps": ("--sweeps", "scaling")}


def _cmd_perf(args: argparse.Namespace) -> int:
  program = args.program or ("peers" if args.peers else "scaling" if args.scaling
                             else "throughput")
  if args.program and (args.peers or args.scaling):
    flag = "--peers" if args.peers else "--scaling"
    if flag.removeprefix("--") != args.program:
      raise ValueError(f"advsweep perf {args.program} {flag}: two programs; {flag} is the old "
                       f"spelling of `advsweep perf {flag.removeprefix('--')}`")
  for field, (flag, owner) in _PERF_ONLY.items():
    if getattr(args, field) is not None and program != owner:
      raise ValueError(f"{flag} applies to `advsweep perf {owner}` only, not to {program}")
  if program == "peers":
    from advsweep.bench.perf import peers

    return peers.main(models=args.models, attack_names=args.attacks,
                      num_images=args.num_images, pixel_images=args.pixel_images,
                      quick=args.quick, out=args.out, data_dir=args.data_dir)
  if program == "scaling":
    from advsweep.bench.perf import scaling

    return scaling.main(sweeps=args.sweeps, out=args.out, data_dir=args.data_dir)
  from advsweep.bench.perf import throughput

  return throughput.main(models=args.models, attack_names=args.attacks,
                         num_images=args.num_images, quick=args.quick, out=args.out,
                         data_dir=args.data_dir)


def _cmd_run(args: argparse.Namespace) -> int:
  import jax

  from advsweep.bench.driver import config, sweep
  from advsweep.bench.reports import report

  process = jax.process_index()  # `main` joined a multi-process job, where there is one
  for name in args.attacks or []:
    config.check_attack_name(name)
  overrides = list(args.set) + (["save_images=true"] if args.save_images else [])
  cfg = config.load(args.config, overrides, quick=args.quick)
  if args.attacks:
    raw = dict(cfg.raw, attacks={k: v for k, v in cfg.raw["attacks"].items()
                                 if k in args.attacks})
    cfg = config.resolve(raw, source=args.config)
  shard = sweep.parse_shard(args.shard)
  if args.shard is None and (from_slurm := sweep.slurm_shard()) is not None:
    shard = from_slurm
    print(f"advsweep run: shard {shard[0]}/{shard[1]} from SLURM_ARRAY_TASK_ID="
          f"{os.environ['SLURM_ARRAY_TASK_ID']} (pass --shard to choose another)")
  out_dir = Path(args.out) if args.out else _out_folder(str(Path("results") / cfg.name))
  if args.ray is not None:
    if args.shard is not None or jax.process_count() > 1:
      raise ValueError("--ray runs every unit of the sweep as a Ray task: drop --shard (and "
                       "the multi-process launch); Ray spreads the units itself")
    from advsweep.bench.driver import ray_sweep

    cache = jax.config.jax_compilation_cache_dir
    outcome = ray_sweep.run(cfg, out_dir, address=args.ray, data_dir=args.data_dir,
                            checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume,
                            progress=not args.no_progress,
                            compile_cache=None if args.no_compile_cache else cache)
  else:
    outcome = sweep.run(cfg, out_dir, shard=shard, resume=not args.no_resume,
                        data_dir=args.data_dir, progress=not args.no_progress,
                        checkpoint_dir=args.checkpoint_dir)
  if process == 0 and not args.no_report:
    if outcome.units_done < outcome.units_total:
      print(f"{out_dir}: {outcome.units_done} of {outcome.units_total} units written so far; "
            "the table covers those")
    report.report(out_dir)
  return 0


def _cmd_report(args: argparse.Namespace) -> int:
  from advsweep.bench.reports import report

  if args.format == "json":
    print(report.summary_json(args.folder))
    return 0
  report.report(args.folder, args.out, plots=not args.no_plots)
  return 0


def _cmd_compare(args: argparse.Namespace) -> int:
  from advsweep.bench.reports import compare

  return compare.compare(args.baseline, args.new, time_factor=args.time_factor,
                         time_floor=args.time_floor, output_format=args.format)


def _cmd_reproduce(args: argparse.Namespace) -> int:
  from advsweep.bench.reports import reproduce

  reproduce.reproduce(args.paper, quick=args.quick, out_root=args.out,
                      data_dir=args.data_dir, overrides=args.set,
                      progress=not args.no_progress)
  return 0


# `advsweep robustness --standard`: every zoo model, the undefended beside their defenses.
STANDARD_MODELS = ("mnist_lenet", "mnist_lenet_fgsm", "mnist_lenet_pgd", "mnist_lenet_alp",
                   "mnist_lenet_advgan", "mnist_lenet_gauss", "mnist_softmax",
                   "fashion_mnist_lenet",
                   "cifar10_resnet20", "cifar10_resnet20_adv", "cifar10_resnet20_denoise",
                   "cifar10_resnet20_gauss", "cifar10_resnet20_da", "cifar10_allconv",
                   "cifar10_nin", "cifar10_vgg", "cifar10_wide_resnet20_adv")


def _cmd_robustness(args: argparse.Namespace) -> int:
  if args.standard:
    from advsweep.bench.evaluation import standard_runs

    models = args.models or [m for m in STANDARD_MODELS if m in zoo.available()]
    standard_runs.run_zoo(models, num_images=args.num_images or (20 if args.quick else 1000),
                          norm=args.norm, quick=args.quick, out_root=args.out,
                          data_dir=args.data_dir, seed=args.seed,
                          batch_size=args.batch_size, beside=args.beside or (),
                          progress=not args.no_progress)
    return 0
  standard_only = [flag for flag, value in (("--models", args.models), ("--norm", args.norm
                   != "linf"), ("--num-images", args.num_images), ("--beside", args.beside))
                   if value]
  if standard_only:
    raise ValueError(f"{', '.join(standard_only)} only apply with --standard")
  from advsweep.bench.reports import robustness

  robustness.run(quick=args.quick, out_root=args.out, data_dir=args.data_dir,
                 overrides=args.set, progress=not args.no_progress)
  return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
  from advsweep.bench import analyses
  from advsweep.bench.driver import config, sweep

  run_dir = args.run_dir
  if run_dir is None:  # the analyses' own one-pixel run, made (or resumed) first
    cfg = config.load(analyses.DEFAULT_CONFIG, quick=args.quick)
    run_dir = Path(args.out) / cfg.name
    sweep.run(cfg, run_dir, data_dir=args.data_dir, progress=not args.no_progress)
  kinds = list(analyses.ANALYSES) if args.kind == ALL_ANALYSES else [args.kind]
  for kind in kinds:
    output = analyses.run(kind, run_dir, data_dir=args.data_dir, attack=args.attack,
                          quick=args.quick, checkpoint_dir=args.checkpoint_dir)
    print(output.text())
    written = [p.name for p in output.figures]
    print(f"wrote {analyses.common.analysis_dir(run_dir)}/: {kind}.parquet, {kind}.md"
          + "".join(f", {name}" for name in written) + "\n")
  return 0


ALL_ANALYSES = "all"


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors: the problem and where to read more, no usage dump."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _whole_number(low: int) -> typing.Callable[[str], int]:
  """An argparse type: an integer >= `low`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < low:
      raise argparse.ArgumentTypeError(f"expected a whole number >= {low}; got {text!r}")
    return value
  return parse


_count, _seed = _whole_number(1), _whole_number(0)


def _out_folder(text: str) -> Path:
  """An argparse type: a folder that exists or can be created, and can be written. Probed
  with a temporary file in the nearest existing folder, removed at once: nothing is left."""
  path = Path(text)
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{path} is a file, not a folder; name a folder")
  existing = path
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise argparse.ArgumentTypeError(f"{existing} is a file, so {path} cannot be created; "
                                     "name a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".advsweep-probe-", dir=existing)
    os.close(fd)
    os.unlink(probe)
  except OSError as err:
    raise argparse.ArgumentTypeError(
        f"cannot write in {existing} ({err.strerror}); name a folder you can write") from None
  return path


# Failures a user can cause and fix: printed as one line, never as a traceback.
_USER_ERRORS = (ValueError, OSError, argparse.ArgumentTypeError)


def _version() -> str:
  """`advsweep VERSION (git REVISION)`: the installed version and the checkout's commit."""
  import importlib.metadata

  from advsweep.bench.driver import results

  try:
    version = importlib.metadata.version("advsweep")
  except importlib.metadata.PackageNotFoundError:
    version = "not installed"
  return f"advsweep {version} (git {results.git_sha()})"


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="advsweep", description="JAX benchmark suite for adversarial attacks.")
  parser.add_argument("--version", action="version", version=_version(),
                      help="print advsweep's version and git revision")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("init", help="write a working sweep config for your model")
  p.add_argument("model", metavar="MODEL",
                 help="your model: package.module:function, an entry point, or a zoo model")
  p.add_argument("--dataset", default=None,
                 help="what it classifies: mnist, fashion_mnist, cifar10, or a folder or .npz "
                 "of yours (default: the model's own)")
  p.add_argument("--out", default="advsweep.toml", help="the config file to write")
  p.add_argument("--force", action="store_true", help="replace an existing file")
  p.set_defaults(func=_cmd_init)

  p = sub.add_parser("models", help="list the model zoo with accuracy and size")
  p.add_argument("--checkpoint-dir", default=None,
                 help="folder of checkpoints (default: the shipped zoo)")
  p.add_argument("--markdown", action="store_true", help="print a Markdown table")
  p.set_defaults(func=_cmd_models)

  p = sub.add_parser("train", help="train a zoo model with its recipe")
  p.add_argument("model", choices=list(zoo.ZOO), metavar="MODEL",
                 help="one of: " + ", ".join(zoo.ZOO))
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--epochs", type=_count, default=None, help="override the recipe's epochs")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"),
                 help="local data folder (default: $ADVSWEEP_DATA_DIR)")
  p.add_argument("--out-dir", type=_out_folder, default=str(zoo.CHECKPOINT_DIR),
                 help="where to write <model>.msgpack and .json (default: the zoo)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--restart", action="store_true",
                 help="discard the saved state of an interrupted run instead of resuming it")
  p.add_argument("--keep-epochs", action="store_true",
                 help="also keep each epoch's weights, <out-dir>/<model>.epochs/epochNNN/ (a "
                 "checkpoint folder each), for robustness against epochs")
  p.set_defaults(func=_cmd_train)

  p = sub.add_parser("gan", help="train the DCGAN or AdvGAN's generator against a model")
  p.add_argument("kind", choices=("dcgan", "advgan"))
  p.add_argument("model", nargs="?", default=None,
                 help="advgan: the model to train the generator against (any reference "
                 "`attack` takes)")
  p.add_argument("--dataset", choices=("mnist", "fashion_mnist", "cifar10"), default="mnist",
                 help="dcgan: the dataset (default: mnist)")
  p.add_argument("--eps", type=float, default=0.3, help="advgan: the L-inf budget (0.3)")
  p.add_argument("--targeted", action="store_true",
                 help="advgan: the targeted generator (target class as input)")
  p.add_argument("--epochs", type=_count, default=None, help="override the recipe's epochs")
  p.add_argument("--kappa", type=float, default=None,
                 help="advgan: override the margin's confidence (the recipe's kappa)")
  p.add_argument("--train-limit", type=_count, default=None,
                 help="train on the first N training images (short runs)")
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--out", default=None,
                 help="dcgan: the checkpoint file (default: the shipped models/trained/gan/"
                 "dcgan_DATASET.msgpack); advgan: the folder (default: the generator cache)")
  p.add_argument("--checkpoint-dir", default=None,
                 help="advgan: load a zoo MODEL from this folder instead of the shipped zoo")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"),
                 help="local data folder (default: $ADVSWEEP_DATA_DIR)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(func=_cmd_gan)

  from advsweep import attacks  # the registry names the attacks

  p = sub.add_parser("attack", help="run one attack on a model's first N test images")
  p.add_argument("model", metavar="MODEL",
                 help="a zoo model (" + ", ".join(zoo.ZOO) + "), MODEL+DEFENSE (e.g. "
                 "mnist_lenet+jpeg:75), an entry point, package.module:function (found from "
                 "the current folder too), or a checkpoint file NAME.msgpack")
  p.add_argument("--checkpoint-dir", default=None,
                 help="where a zoo model's checkpoint is (default: the shipped zoo)")
  p.add_argument("attack", choices=list(attacks.REGISTRY), metavar="ATTACK",
                 help="one of: " + ", ".join(attacks.REGISTRY))
  p.add_argument("-n", "--num-images", type=_count, default=100)
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set eps=0.1 (repeatable)")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.set_defaults(func=_cmd_attack)

  p = sub.add_parser("perf", help="benchmarks of advsweep itself: throughput (default), "
                     "peers, scaling")
  p.add_argument("program", nargs="?", choices=PERF_PROGRAMS, default=None,
                 help="throughput: attacks against the model's raw throughput (default); "
                 "peers: beside ART and Foolbox; scaling: cost against batch, image size, k "
                 "and population")
  p.add_argument("--models", nargs="+", default=None,
                 help="zoo models or users' (package.module:function; e.g. "
                 "advsweep.bench.perf.user_models:cifar10_allconv); default: mnist_lenet and "
                 "a shipped CIFAR-10 model")
  p.add_argument("--attacks", nargs="+", default=None, choices=list(attacks.REGISTRY))
  p.add_argument("-n", "--num-images", type=_count, default=None,
                 help="images per attack (default 32; --peers: 256 for FGSM/BIM/PGD, 100 for "
                      "JSMA)")
  p.add_argument("--quick", action="store_true",
                 help="small budgets (few generations and steps): a smoke run in a minute")
  p.add_argument("--out", type=_out_folder, default="results/perf",
                 help="folder for the parquet file")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.add_argument("--peers", action="store_true",
                 help="the old spelling of `advsweep perf peers` (needs pip install -e "
                 '".[peers]")')
  p.add_argument("--pixel-images", type=_count, default=None,
                 help="peers: images for the one-pixel comparison (default 32)")
  p.add_argument("--scaling", action="store_true",
                 help="the old spelling of `advsweep perf scaling`")
  p.add_argument("--sweeps", nargs="+", default=None,
                 choices=["batch", "image_size", "pixels", "population", "retrace"],
                 help="scaling: which sweeps (default all)")
  p.set_defaults(func=_cmd_perf)

  from advsweep.bench.driver import config
  from advsweep.bench.reports import compare, reproduce

  p = sub.add_parser("run", help="run a sweep config (default: main) and print its table")
  p.add_argument("config", nargs="?", default=config.DEFAULT_CONFIG,
                 help=f"a config in bench/configs ({', '.join(config.available())}) or a "
                 "path to a .toml file")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field: images.per_bin=20, "
                 "attacks.fgsm.eps=[0.1,0.3], models=['mnist_softmax'] (repeatable)")
  p.add_argument("--attacks", nargs="+", default=None, metavar="ATTACK",
                 help="run only these of the config's attacks")
  p.add_argument("--quick", action="store_true", help="apply the config's [quick] table")
  p.add_argument("--out", type=_out_folder, default=None,
                 help="run folder (default: results/<name>)")
  p.add_argument("--shard", default=None, metavar="K/N",
                 help="run the K-th (0-based) of N disjoint parts of the sweep (default: "
                 "from SLURM_ARRAY_TASK_ID and _COUNT in a job array, else 0/1)")
  p.add_argument("--no-resume", action="store_true",
                 help="refuse to continue a folder that already has units of this run")
  p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                 help="run the units as Ray tasks on the cluster at ADDRESS (auto, "
                 "ray://HOST:10001), or on a local cluster of this machine without one "
                 "(pip install 'advsweep[ray]')")
  p.add_argument("--no-report", action="store_true", help="do not print the summary")
  p.add_argument("--save-images", action="store_true",
                 help="also write each unit's adversarial images to RUN/images/*.npz")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.add_argument("--checkpoint-dir", default=None,
                 help="folder of zoo checkpoints to use instead of the shipped ones")
  p.set_defaults(func=_cmd_run)

  p = sub.add_parser("report", help="summary tables (text, Markdown, CSV) and plots of a run")
  p.add_argument("folder", help="a run folder, e.g. results/main")
  p.add_argument("--out", type=_out_folder, default=None,
                 help="where to write (default: FOLDER/report)")
  p.add_argument("--no-plots", action="store_true")
  p.add_argument("--format", choices=["text", "json"], default="text",
                 help="text: tables (and files); json: the summary as JSON on stdout, for CI")
  p.set_defaults(func=_cmd_report)

  p = sub.add_parser("compare", help="regression check: exit 1 if a cell moved")
  p.add_argument("baseline", help="baseline run folder, e.g. results/baselines/ci")
  p.add_argument("new", help="new run folder")
  p.add_argument("--time-factor", type=float, default=compare.DEFAULT_TIME_FACTOR,
                 help="fail when time per image grows by more than this factor "
                 f"(default {compare.DEFAULT_TIME_FACTOR:g})")
  p.add_argument("--time-floor", type=float, default=compare.DEFAULT_TIME_FLOOR,
                 help="...and by more than this many seconds over the cell's images "
                 f"(default {compare.DEFAULT_TIME_FLOOR:g})")
  p.add_argument("--format", choices=["text", "json"], default="text",
                 help="text: tables (and files); json: the comparison as JSON on stdout, for CI")
  p.set_defaults(func=_cmd_compare)

  p = sub.add_parser("reproduce", help="a paper's table, ours beside the published one")
  p.add_argument("paper", choices=reproduce.papers(), metavar="PAPER",
                 help="one of: " + ", ".join(reproduce.papers()))
  p.add_argument("--quick", action="store_true", help="the small CPU version (minutes)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--out", type=_out_folder, default="results", help="folder for the run folders")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.set_defaults(func=_cmd_reproduce)

  p = sub.add_parser("robustness", help="every zoo model against FGSM, PGD with restarts, "
                     "one-pixel and JSMA, beside its twin (bench/configs/robustness.toml)")
  p.add_argument("--quick", action="store_true", help="the small CPU version (minutes)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set images.per_bin=20")
  p.add_argument("--out", type=_out_folder, default="results", help="folder for the run folder")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.add_argument("--standard", action="store_true",
                 help="AutoAttack's standard evaluation (APGD-CE, APGD-T, FAB-T, Square; "
                 "robust = correct under every attack) on the first N test images")
  p.add_argument("--models", nargs="+", metavar="MODEL",
                 help="with --standard: zoo models or MODEL+DEFENSE (default: every trained "
                 "zoo model)")
  p.add_argument("--norm", choices=["linf", "l2"], default="linf",
                 help="with --standard: the threat model (L2: CIFAR-10 at 0.5)")
  p.add_argument("--num-images", type=_count, default=None,
                 help="with --standard: first N test images (default 1000, --quick 20)")
  p.add_argument("--seed", type=_seed, default=0)
  p.add_argument("--batch-size", type=_count, default=None,
                 help="with --standard: images per attack call (default: by backend; on a "
                 "CPU 32 for the gradient attacks, 500 for Square); outcomes do not depend on it")
  p.add_argument("--beside", nargs=2, action="append", metavar=("MODEL", "OTHER"),
                 help="with --standard: also compare MODEL with OTHER image by image (exact "
                 "McNemar, Newcombe interval), both among --models; repeatable (each model "
                 "is compared with its twin anyway)")
  p.set_defaults(func=_cmd_robustness)

  from advsweep.bench.analyses import ANALYSES

  p = sub.add_parser("analyze", help="a paper's analysis of a run: parquet, PNGs and its "
                     "headline table under RUN_DIR/analysis/")
  p.add_argument("kind", choices=[*ANALYSES, ALL_ANALYSES], metavar="KIND",
                 help="one of: " + ", ".join(ANALYSES) + f", or {ALL_ANALYSES}")
  p.add_argument("run_dir", nargs="?", default=None,
                 help="a run folder, e.g. results/su2019 (default: run or resume "
                 "bench/configs/onepixel_analysis.toml, its [quick] table with --quick)")
  p.add_argument("--out", type=_out_folder, default="results",
                 help="where the default run's folder goes (default results)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--attack", default="one_pixel",
                 help="the attack whose rows are analysed (default one_pixel)")
  p.add_argument("--quick", action="store_true", help="fewer images and a smaller grid")
  p.add_argument("--data-dir", default=os.environ.get("ADVSWEEP_DATA_DIR"))
  p.add_argument("--checkpoint-dir", default=None,
                 help="the zoo checkpoints the run was made with (default: the folder its "
                 "run.json records, else the shipped ones); rows of other weights are refused")
  p.set_defaults(func=_cmd_analyze)
  for command in sub.choices.values():
    command.add_argument(
        "--no-compile-cache", action="store_true",
        help="compile every program anew (default: XLA's persistent cache in "
        "~/.cache/advsweep/jax, or $ADVSWEEP_COMPILE_CACHE; 0 there switches it off)")
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one command. Expected failures (bad input, missing or corrupt files) print one line
  naming the problem and the fix and exit 2; Ctrl-C exits 130. ADVSWEEP_TRACEBACK=1 re-raises
  instead, for debugging."""
  command = (sys.argv[1:] if argv is None else argv)[:1]
  try:
    if command == ["run"]:  # join a multi-process job before importing the attacks starts
      from advsweep.bench.driver import distributed  # JAX (only `run` shares work across hosts)

      distributed.maybe_initialize()
  except (ValueError, RuntimeError) as err:
    print(f"advsweep run: error: cannot join the multi-process job: {_one_line(err)}",
          file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  from advsweep.bench.driver import compilation

  compilation.enable_cache(None if args.no_compile_cache else compilation.cache_folder())
  if signal.getsignal(signal.SIGINT) in (_interrupted_while_starting,
                                          signal.default_int_handler):
    interrupts.install()
  try:
    status = args.func(args)
    if interrupts.requested():  # raised where it was dropped, and the command ended
      raise KeyboardInterrupt
    return status
  except KeyboardInterrupt:
    if os.environ.get("ADVSWEEP_TRACEBACK"):
      raise
    print(f"advsweep {args.command}: interrupted; what was written is whole (run the same "
          "command again to continue a sweep)", file=sys.stderr)
    return 130
  except _USER_ERRORS as err:
    if os.environ.get("ADVSWEEP_TRACEBACK"):
      raise
    print(f"advsweep {args.command}: error: {_one_line(err)}", file=sys.stderr)
    return 2


def _one_line(err: BaseException) -> str:
  if isinstance(err, OSError) and err.strerror and err.filename:
    return f"{err.filename}: {err.strerror}"
  return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
  sys.exit(main())
