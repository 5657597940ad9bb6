"""The package's shape: one spec per attack read by the driver, one installable namespace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from advsweep import attacks
from advsweep.attacks import checks, common
from advsweep.bench.driver import config, results, runs, sweep
from advsweep.bench.reports import compare, report
from tests.conftest import DATA_DIR, requires_data

ROOT = Path(__file__).resolve().parents[1]


@struct.dataclass
class NoiseConfig:
  """A toy attack's config: uniform sign noise of size eps."""

  eps: float = 0.3


def noise(apply_fn, params, images, labels, key, config=None, *, targets=None,
          evaluator=None) -> attacks.AttackResult:
  """Every pixel moved by +-eps at random (one key per image), then re-checked."""
  del evaluator
  config = config or NoiseConfig()
  keys = common.per_image_keys(key, images.shape[0])
  signs = jax.vmap(lambda k, x: jax.random.rademacher(k, x.shape, x.dtype))(keys, images)
  adv = jnp.clip(images + config.eps * signs, 0.0, 1.0)
  targets = jnp.full(labels.shape, common.NO_TARGET, jnp.int32)
  queries = jnp.ones(labels.shape, jnp.int32)
  return common.finalize(apply_fn, params, images, adv, labels, targets, queries)


def _check_noise(config: NoiseConfig) -> None:
  checks.check_at_least("eps", config.eps, 0.0)


NOISE = attacks.AttackSpec(
    name="noise", run=noise, core=noise, config_cls=NoiseConfig, check_config=_check_noise,
    within_budget=lambda c, r, n: np.asarray(r.linf) <= c.eps + 1e-6,
    forward_equivalents=lambda c, n, k: 2.0, unit=lambda c: attacks.spec.FORWARD,
    budget_field="eps")


@pytest.fixture
def registered_noise():
  attacks.register(NOISE)  # the one line that adds an attack
  yield NOISE
  del attacks.REGISTRY["noise"]


def test_a_taken_name_is_refused(registered_noise):
  with pytest.raises(ValueError, match="already registered"):
    attacks.register(attacks.AttackSpec(**{**vars(NOISE), "run": lambda *a, **k: None}))


def test_config_values_are_checked_against_the_spec(registered_noise):
  with pytest.raises(config.ConfigError, match="attacks.noise.eps takes a number"):
    config.attack_config("noise", {"eps": "big"})
  with pytest.raises(config.ConfigError, match="eps must be >= 0"):
    config.attack_config("noise", {"eps": -1})
  with pytest.raises(config.ConfigError, match="unknown field 'epsilon' for attack noise"):
    config.attack_config("noise", {"epsilon": 0.1})


@requires_data
def test_a_registered_toy_attack_runs_through_sweep_report_and_compare(
    registered_noise, tmp_path, data_dir):
  raw = {"name": "toy", "models": ["mnist_softmax"], "batch_size": 10,
         "images": {"per_bin": 5, "pool": 500}, "bins": {"thresholds": [0.99, 0.9]},
         "attacks": {"noise": {"eps": [0.1, 0.5]}}}
  run_config = config.resolve(raw)
  out = tmp_path / "toy"
  lines = []
  outcome = sweep.run(run_config, out, data_dir=str(data_dir), progress=False,
                      log=lines.append)
  assert outcome.units_run == outcome.units_total == 4  # 2 eps x (15 images in tens)
  assert any("estimated at most" in line for line in lines)  # the spec's cost
  table = results.read_run(out)
  cols = report.columns(table)
  assert set(cols["attack"]) == {"noise"} and np.all(cols["valid"])
  assert set(cols["evaluation"]) == {attacks.FULL_EVALUATION}
  logged = []
  cells = report.report(out, log=logged.append)
  rates = {c.param_dict["eps"]: c.success_rate for c in cells if c.conf_bin == report.ALL_BINS}
  assert rates[0.5] > rates[0.1]  # more noise flips more of the shallow softmax's images
  assert "noise" in logged[0]
  assert list((out / "report").glob("success-vs-mnist_softmax-noise-eps*.png"))
  assert compare.compare(out, out, log=lambda *_: None) == 0


def _driver_modules() -> list[Path]:
  """bench/'s modules but the self-benchmarks (bench/perf/ names the peers' attacks)."""
  return [p for p in (ROOT / "bench").rglob("*.py") if "perf" not in p.relative_to(ROOT).parts]


def _names_bench_must_not_branch_on() -> set[str]:

  from advsweep.models import defenses

  papers = {p.parent.name for p in (ROOT / "bench" / "papers").glob("*/paper.toml")}
  return set(attacks.REGISTRY) | papers | set(defenses.KINDS)


def test_bench_never_branches_on_an_attack_paper_or_defense_name():
  """Facts about an attack live in its spec, about a paper in its folder, about a
  defense in its record: no `x == "pgd"`, `paper == "papernot2016"` or `in ("jpeg", ...)`."""
  names = _names_bench_must_not_branch_on()
  pattern = re.compile(r"""(==|!=|\bin\b)\s*[(\[{]?\s*["']([a-z0-9_]+)["']""")
  for path in _driver_modules():
    for number, line in enumerate(path.read_text().splitlines(), 1):
      for match in pattern.finditer(line):
        assert match.group(2) not in names, f"{path.name}:{number}: {line.strip()}"


def _modules() -> dict[str, Path]:
  """advsweep's modules by dotted name, from the source folders."""
  out = {}
  for folder in ("attacks", "bench", "models"):
    for path in (ROOT / folder).rglob("*.py"):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out["advsweep." + ".".join(parts)] = path
  return out


def _imports(path: Path, modules: dict[str, Path]) -> dict[str, str]:
  """The advsweep modules `path` imports, any where in the file, by local name -> module."""
  import ast

  out = {}
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("advsweep"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out[alias.asname or alias.name] = full if full in modules else node.module
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("advsweep"):
          out[alias.asname or alias.name] = alias.name
  return out


def test_the_import_graph_has_no_cycle():
  """Built from the source, lazy imports inside functions included: no module reaches
  itself."""
  modules = _modules()
  graph = {m: {t for t in _imports(p, modules).values() if t in modules and t != m}
           for m, p in modules.items()}
  state: dict[str, int] = {}  # 1: on the path, 2: done

  def visit(module: str, path: list[str]) -> None:
    state[module] = 1
    for target in sorted(graph[module]):
      assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, module, target])
      if target not in state:
        visit(target, [*path, module])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [])


def test_no_module_reaches_a_private_name_of_another():
  import ast

  modules = _modules()
  for module, path in modules.items():
    local = _imports(path, modules)
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("advsweep"):
        for alias in node.names:
          private = alias.name.startswith("_") and not alias.name.startswith("__")
          assert not private, f"{path}:{node.lineno}: imports {node.module}.{alias.name}"
      if isinstance(node, ast.Attribute) and node.attr.startswith("_") and (
          not node.attr.startswith("__")):
        root = node.value
        while isinstance(root, ast.Attribute):
          root = root.value
        target = local.get(root.id) if isinstance(root, ast.Name) else None
        assert target is None or target == module, (
            f"{path}:{node.lineno}: {ast.unparse(node)} is private to {target}")


def test_attacks_functions_stay_short():
  """No function in attacks/ over about 60 lines (docstring included)."""
  import ast

  for path in (ROOT / "attacks").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef):
        length = node.end_lineno - node.lineno + 1
        assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_nothing_imports_the_top_level_folders_by_their_bare_names():
  pattern = re.compile(r"^\s*(from|import)\s+(attacks|bench|models)(\.|\s|$)")
  for folder in ("attacks", "bench", "models", "tests"):
    for path in (ROOT / folder).rglob("*.py"):
      for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not pattern.match(line), f"{path}:{number}: {line.strip()}"


# The layout the user fixed: these folders and files at the top level, nothing else.
TOP_LEVEL = {"pyproject.toml", "README.md", "bench", "models", "attacks", "tests", "results",
             "docs", "mkdocs.yml", ".ci", ".gitignore"}


def test_the_top_level_holds_the_fixed_layout_only():
  tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           timeout=60)
  if tracked.returncode != 0:
    pytest.skip("not a git checkout")
  tops = {name.split("/")[0] for name in tracked.stdout.decode().split("\0") if name}
  assert tops <= TOP_LEVEL, f"unexpected at the top level: {sorted(tops - TOP_LEVEL)}"


def _source_copy(destination: Path) -> Path:
  """The project's files in `destination`: the committed ones in a git checkout, else the
  tree without build outputs. Building from a copy keeps a build/ folder out of the
  checkout, whose stale modules would leak into later wheels."""
  tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           timeout=60)
  if tracked.returncode != 0:
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        "build", "dist", ".venv", "site", "*.egg-info", "results", ".git"))
    return destination
  for name in tracked.stdout.decode().split("\0"):
    if name and (ROOT / name).is_file():
      (destination / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, destination / name)
  return destination


def test_the_wheel_installs_everything_under_advsweep(tmp_path):
  source = _source_copy(tmp_path / "source")
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  (wheel,) = tmp_path.glob("advsweep-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"advsweep", next(t for t in tops if t.endswith(".dist-info"))}
  for needed in ("advsweep/attacks/__init__.py", "advsweep/bench/configs/ci.toml",
                 "advsweep/bench/papers/su2019/paper.toml",
                 "advsweep/bench/papers/su2019/su2019.toml",
                 "advsweep/models/trained/mnist_lenet.json", "advsweep/attacks/advgan/core.py",
                 "advsweep/models/gan/generators.py",
                 "advsweep/bench/papers/xiao2018/paper.toml"):
    assert needed in names
  shipped = sorted(p.relative_to(ROOT / "models").as_posix()
                   for p in (ROOT / "models" / "trained").rglob("*") if p.suffix in (".msgpack",
                                                                         ".json")
                   and not p.name.endswith(".resume.msgpack"))
  assert {f"advsweep/models/{p}" for p in shipped} <= set(names)  # every shipped weight
  assert "advsweep/__init__.py" not in names  # a namespace: nothing else can claim it
  if DATA_DIR is None:
    return
  # Installed alone (no source tree on the path), the wheel runs a sweep and a paper's config.
  target = tmp_path / "installed"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                         str(target), str(wheel)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  env = dict(os.environ, PYTHONPATH=str(target), ADVSWEEP_DATA_DIR=str(DATA_DIR))
  code = ("import sys, advsweep.bench.driver.sweep as s; print(s.__file__); "
          "from advsweep.bench import cli; sys.exit(cli.main(sys.argv[1:]))")
  run = subprocess.run([sys.executable, "-c", code, "run", "ci", "--set", "images.per_bin=2",
                        "--out", str(tmp_path / "run"), "--no-progress", "--no-report"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.splitlines()[0].startswith(str(target))  # the wheel's code ran
  assert "su2019" in subprocess.run(
      [sys.executable, "-c", code, "reproduce", "--help"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300).stdout


def test_every_folder_that_ships_files_is_a_listed_package():
  """setuptools packages a folder's files only when the folder is in pyproject's `packages`
  list (and warns, page after page, when package data sits in one that is not): a new paper
  folder or model subfolder must be listed there."""
  setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  listed = set(setuptools["packages"])
  shipped = (".py", ".toml", ".json", ".msgpack")
  for package, folder in setuptools["package-dir"].items():
    for sub in [ROOT / folder, *(ROOT / folder).rglob("*")]:
      if (sub.is_dir() and "__pycache__" not in sub.parts
          and any(f.suffix in shipped for f in sub.iterdir() if f.is_file())):
        dotted = ".".join([package, *sub.relative_to(ROOT / folder).parts])
        assert dotted in listed, f"{dotted} ships files but is not in pyproject's packages"


def test_the_sdist_builds_the_same_wheel(tmp_path):
  """What PyPI's users get from the source archive: the sdist (built offline by setuptools)
  holds the sources and the shipped weights, and the wheel built from it has the files of
  the wheel built from the tree."""
  source = _source_copy(tmp_path / "source")
  build = ("import sys; from setuptools import build_meta as b; "
           "print(b.build_sdist(sys.argv[1]) if sys.argv[2] == 'sdist' "
           "else b.build_wheel(sys.argv[1]))")
  for kind in ("sdist", "wheel"):
    proc = subprocess.run([sys.executable, "-c", build, str(tmp_path / kind), kind],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
  (sdist,) = (tmp_path / "sdist").glob("advsweep-*.tar.gz")
  with tarfile.open(sdist) as archive:
    members = {m.split("/", 1)[1] for m in archive.getnames() if "/" in m}
  for needed in ("pyproject.toml", "README.md", "attacks/advgan/core.py",
                 "models/trained/mnist_lenet.msgpack", "bench/configs/ci.toml"):
    assert needed in members, needed
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", str(tmp_path / "from-sdist"), str(sdist)], capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (from_sdist,) = (tmp_path / "from-sdist").glob("advsweep-*.whl")
  (from_tree,) = (tmp_path / "wheel").glob("advsweep-*.whl")
  assert (sorted(zipfile.ZipFile(from_sdist).namelist())
          == sorted(zipfile.ZipFile(from_tree).namelist()))


def _user_project(folder: Path) -> None:
  """A user's project with packages of its own named like our folders."""
  for name in ("models", "bench", "attacks"):
    package = folder / name
    package.mkdir()
    (package / "__init__.py").write_text(
        f"raise ImportError('the user project\\'s own {name} package was imported')\n")


@requires_data
def test_advsweep_run_ci_from_a_project_with_its_own_models_package(tmp_path, data_dir):
  project = tmp_path / "project"
  project.mkdir()
  _user_project(project)
  env: dict[str, Any] = dict(os.environ, PYTHONPATH=str(project),
                             ADVSWEEP_DATA_DIR=str(data_dir))
  check = subprocess.run(
      [sys.executable, "-c", "import advsweep.models, advsweep.bench.cli; import models"],
      cwd=project, env=env, capture_output=True, text=True, timeout=120)
  assert "the user project's own models package was imported" in check.stderr  # theirs
  assert "advsweep" not in check.stderr.splitlines()[-1]
  advsweep = Path(sys.executable).with_name("advsweep")
  proc = subprocess.run(
      [str(advsweep), "run", "ci", "--out", str(tmp_path / "ci"), "--no-progress",
       "--attacks", "fgsm", "--set", "images.per_bin=3"],
      cwd=project, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "fgsm" in proc.stdout
  assert results.read_run(tmp_path / "ci").num_rows == 2 * 9  # 2 eps x 3 bins x 3 images


def test_the_driver_never_imports_the_self_benchmarks():
  """bench/perf/ (advsweep's benchmarks of itself) is reached only by the command line."""
  modules = _modules()
  for path in _driver_modules():
    if path.name == "cli.py":
      continue
    for target in _imports(path, modules).values():
      assert not target.startswith("advsweep.bench.perf"), f"{path} imports {target}"


# --- Each kind of addition is registered in one place and runs end to end. ----------------

TOY_CONFIG = """name = "{name}"
models = ["{model}"]
batch_size = 4
[images]
per_bin = 4
pool = 200
[bins]
names = ["all"]
thresholds = []
[attacks.fgsm]
eps = [0.1, 0.3]
"""


@requires_data
def test_a_toy_paper_is_a_folder(tmp_path, data_dir, monkeypatch, capsys):
  from advsweep.bench import cli, papers

  folder = tmp_path / "papers" / "toy2026"
  folder.mkdir(parents=True)
  (folder / "toy2026.toml").write_text(TOY_CONFIG.format(name="toy2026",
                                                          model="mnist_softmax"))
  (folder / "paper.toml").write_text(
      'title = "Toy, T. A toy paper (2026)"\nnote = "a test"\nconfigs = ["toy2026"]\n'
      '[[figures]]\nwhat = "FGSM success, eps 0.3"\nmodel = "mnist_softmax"\n'
      'attack = "fgsm"\nparams = { eps = 0.3 }\nmetric = "success_rate"\nvalue = 0.9\n'
      'source = "the toy paper, Table 1"\n')
  monkeypatch.setattr(papers, "FOLDERS", [*papers.FOLDERS, tmp_path / "papers"])
  monkeypatch.setenv("ADVSWEEP_DATA_DIR", str(data_dir))
  assert cli.main(["reproduce", "toy2026", "--out", str(tmp_path / "out"),
                   "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "FGSM success, eps 0.3" in out and "90.00%" in out and "the toy paper" in out
  written = (tmp_path / "out" / "reproduce-toy2026.md").read_text()
  # The docs' papers page shows a kept run as reproduce wrote it, and leaves out a run whose
  # config has changed since.
  from advsweep.bench.perf import pages
  from advsweep.bench.reports import reproduce

  (tmp_path / "out").rename(tmp_path / "results")
  root = tmp_path / "results"
  assert reproduce.kept_state("toy2026", False, root) == "kept"
  assert reproduce.comparison("toy2026", False, root, shown_root=tmp_path / "out")[1] == written
  assert "| FGSM success, eps 0.3 | mnist_softmax | 90.00% |" in pages.papers_page(tmp_path)
  (folder / "toy2026.toml").write_text(TOY_CONFIG.format(name="toy2026", model="mnist_lenet"))
  assert reproduce.kept_state("toy2026", False, root) == "stale"
  page = pages.papers_page(tmp_path)
  assert "FGSM success" not in page and "rerun: `advsweep reproduce toy2026`" in page
  assert reproduce.kept_state("toy2026", True, root) == "missing"


@requires_data
def test_a_toy_input_defense_is_one_record(tmp_path, data_dir, monkeypatch):
  from advsweep.models import defenses

  invert = defenses.Kind("invert", lambda images, level: 1.0 - images, (1, 1))
  monkeypatch.setitem(defenses.REGISTRY, "invert", invert)
  cfg = config.resolve({"name": "inverted", "models": ["mnist_softmax+invert:1"],
                        "batch_size": 4, "images": {"per_bin": 4, "pool": 200},
                        "bins": {"names": ["all"], "thresholds": []},
                        "attacks": {"fgsm": {"eps": 0.1}}})
  sweep.run(cfg, tmp_path / "run", data_dir=str(data_dir), progress=False, estimate=False,
            log=lambda *_: None)
  rows = results.read_run(tmp_path / "run").to_pydict()
  assert set(rows["model"]) == {"mnist_softmax+invert:1"} and len(rows["model"]) == 4
  assert set(rows["evaluation"]) == {"full"}  # the transform reads the whole image
  with pytest.raises(ValueError, match=r"invert takes a level in \[1, 1\]"):
    defenses.parse("invert:2")


@requires_data
def test_a_toy_analysis_is_one_entry(tmp_path, data_dir, monkeypatch, capsys):
  from advsweep.bench import analyses, cli
  from advsweep.bench.analyses import common as analysis_common

  def count_rows(run_dir, *, attack: str = "one_pixel", **_: object):
    _, cols = runs.read_rows(run_dir, attack)
    n = len(cols["model"])
    return analysis_common.Output("rowcount", analysis_common.table_from_columns({"n": [n]}),
                                  ["rows"], [[str(n)]])

  monkeypatch.setitem(analyses.ANALYSES, "rowcount", count_rows)
  config_file = tmp_path / "c.toml"
  config_file.write_text(TOY_CONFIG.format(name="counted", model="mnist_softmax"))
  sweep.run(config.load(str(config_file)), tmp_path / "run", data_dir=str(data_dir),
            progress=False, estimate=False, log=lambda *_: None)
  assert cli.main(["analyze", "rowcount", str(tmp_path / "run"), "--attack", "fgsm"]) == 0
  assert "rowcount:" in capsys.readouterr().out
  assert (tmp_path / "run" / "analysis" / "rowcount.parquet").is_file()


def test_the_docs_results_pages_are_generated_from_the_committed_results():
  """No figure in docs/results/ without its rows: regenerating gives the committed pages
  (after adding results, run `python -m advsweep.bench.perf.pages`)."""
  from advsweep.bench.perf import pages

  for name, text in pages.render(ROOT).items():
    committed = (ROOT / "docs" / "results" / name).read_text()
    assert committed == text, f"docs/results/{name} is stale: python -m advsweep.bench.perf.pages"
    assert "```bash" in text
    assert "Generated from `results/" in text or "Generated from `models/trained/" in text
