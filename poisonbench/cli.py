"""The ``poisonbench`` command: list | run | craft | train | inspect | leaderboard | data | job.

Bad input (unknown names, wrong config keys, values out of range, missing data, broken
stores, output folders that cannot be written) prints one sentence and exits with code
2 before any work starts; ``--debug`` (before or after the verb) shows the traceback
instead. SIGTERM and SIGINT stop a command with a sentence that says what is kept and
exit code 128 + the signal's number (143, 130), as a shell reports a killed process.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from poisonbench import __version__
from poisonbench.errors import ConfigError, PoisonbenchError
from poisonbench.schema.job_config import SCENARIOS

EXIT_BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, so that no ``except Exception`` on the way
    (Lightning's included, which turns KeyboardInterrupt into exit 1 and SIGTERM into
    exit 0) can take it for an error or swallow it; ``main`` reports it and exits
    with 128 + the signal's number, as a shell does for a process the signal killed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# What a stopped verb leaves, and how to go on (a job is done only once its result is
# written; crafting checkpoints every few minutes beside the store's cache path).
RESUME = {
    "run": "finished jobs are kept; run the same command again to go on (unfinished jobs start "
           "afresh, crafting resumes from its last checkpoint)",
    "train": "no result was written; run the same command again to train afresh (crafting "
             "resumes from its last checkpoint)",
    "craft": "run the same command again to resume crafting from its last checkpoint",
    "job": "no result was written; run the same command again to run the job afresh",
}


def _stop(signum: int, frame) -> None:
    # Lightning's own SIGTERM handler runs first (it stops DDP workers) and then calls
    # this one, which it keeps as the previous handler.
    raise Stopped(signum)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_sets(pairs: list[str] | None, option: str = "--set") -> dict:
    """``key=value`` pairs (dotted keys nest, values are YAML) → a nested dict."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{option} expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{option} {key}: {raw!r} is not a valid value") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{option} {key}: {part!r} is set to a value and cannot also hold keys")
        node[leaf] = value
    return out


def seed_arg(text: str) -> int:
    """A seed for every generator involved (scikit-learn and Lightning take [0, 2**32))."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"seed must lie in [0, 2**32), got {seed}")
    return seed


def positive_int(text: str) -> int:
    """A count such as --trials or --epochs: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def gpus_arg(text: str) -> list[str]:
    """``--gpus 0,1,3``: comma-separated GPU ids (non-negative integers), each once."""
    ids = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in ids):
        raise argparse.ArgumentTypeError(f"--gpus expects comma-separated GPU ids such as 0,1,3; got {text!r}")
    if len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"--gpus names a GPU twice: {text!r}")
    return ids


def jobs_per_device_arg(text: str) -> int | str:
    """``--jobs-per-device K``: a positive integer, or ``auto``."""
    if text.strip() == "auto":
        return "auto"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--jobs-per-device expects a positive integer or auto; got {text!r}") from None


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise ``ConfigError`` unless ``path`` is a folder poisonbench can write in or create:
    checked before any work, so that a long craft or training is not lost at its end."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path} cannot be a folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable (no write permission on {probe})")


def check_file_target(path: str | os.PathLike, option: str) -> None:
    """Raise ``ConfigError`` unless ``path`` names a file that can be written (not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give the path of the file to write")
    check_writable(path.parent, f"the folder of {option}")


def check_home() -> None:
    """POISONBENCH_HOME (stores, runs, caches) must be writable before work starts."""
    from poisonbench.files import home

    where = "POISONBENCH_HOME" if os.environ.get("POISONBENCH_HOME") else "the poisonbench home"
    check_writable(home(), where)


def no_wandb_in_smoke_run(args) -> bool:
    """``--wandb`` as asked, or False with a notice under ``--fast-dev-run`` (Lightning
    replaces every logger with a dummy in a smoke run, so nothing would be logged)."""
    if args.wandb and args.fast_dev_run:
        print("poisonbench: --wandb logs nothing under --fast-dev-run (a smoke run); run without "
              "--fast-dev-run to log", file=sys.stderr)
        return False
    return bool(args.wandb)


def console():
    from rich.console import Console

    return Console()


# ----------------------------------------------------------------------- verbs
def cmd_list(args) -> None:
    from poisonbench.attacks import ATTACKS
    from poisonbench.bench.catalogue import profile_names, suite_names, table_ids
    from poisonbench.data import DATASETS
    from poisonbench.defenses import DEFENSES
    from poisonbench.models import MODELS

    kinds = {
        "attacks": ATTACKS.names, "defenses": DEFENSES.names, "models": MODELS.names,
        "datasets": DATASETS.names, "tables": table_ids, "suites": suite_names, "profiles": profile_names,
    }
    for kind in [args.kind] if args.kind else list(kinds):
        print(f"{kind}: {', '.join(kinds[kind]())}")


def cmd_run(args) -> None:
    from poisonbench.bench import runner

    from poisonbench.resolve import check_job

    if args.slurm and args.executor != "slurm":
        raise ConfigError("--slurm sets submitit parameters and needs --executor slurm")
    if args.gpus and args.executor != "local":
        raise ConfigError("--gpus places jobs on this machine's GPUs and needs --executor local")
    if args.jobs_per_device != 1 and args.executor != "local":
        raise ConfigError("--jobs-per-device starts worker processes on this machine and needs --executor local")
    slurm = parse_sets(args.slurm, "--slurm") if args.executor == "slurm" else None
    specs = runner.resolve_tables(args.suite, args.table)
    plans = runner.plan(specs, profile=args.profile, trials=args.trials, rows=args.rows,
                        fast_dev_run=args.fast_dev_run)
    checked = set(runner.not_implemented(plans))  # skipped by run with one line each
    for p in plans:  # every row resolves (names, params) before the first job runs
        for job in p.jobs:
            if (p.spec.id, job.row, job.column) not in checked:
                checked.add((p.spec.id, job.row, job.column))
                check_job(job.config, f"table {p.spec.id} row {job.row!r} column {job.column!r}")
    out = console()
    if args.dry_run:
        runner.show_plan(plans, out)
        return
    check_home()
    if not args.fast_dev_run:
        check_writable(runner.leaderboards_dir(), "the leaderboards folder")
    runner.run(plans, rerun=args.rerun, executor=args.executor, data_root=args.data_root,
               wandb=no_wandb_in_smoke_run(args), gpus=args.gpus, slurm=slurm,
               jobs_per_device=args.jobs_per_device, render=not args.fast_dev_run, console=out)


def cmd_craft(args) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from rich.console import Console

    from poisonbench.attacks import ATTACKS, craft_cached
    from poisonbench.attacks.base import params_dict
    from poisonbench.data import load_imageset
    from poisonbench.files import atomic_path

    attack = ATTACKS.get(args.attack)
    params = attack.params(parse_sets(args.set))
    devices = attack.devices(args.devices)  # bad devices fail before the data is read
    if args.out:
        check_file_target(args.out, "--out")
    check_home()
    base = load_imageset(args.dataset, args.data_root, "train")
    where = ", ".join(str(d) for d in devices)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        progress.add_task(f"crafting {args.attack} on {args.dataset} ({len(base)} images) on {where}", total=None)
        store, seconds = craft_cached(args.attack, base, params_dict(params), args.seed, devices)
    if args.out:
        out = Path(args.out)
        with atomic_path(out) as tmp:
            tmp.write_bytes(Path(store.path).read_bytes())
        path = out
    else:
        path = store.path
    budget = store.budget  # measured when the store was verified
    how = f"crafted in {seconds:.2f}s" if seconds else "from the cache"
    print(f"{path}  ({how}; {budget['modified']} images, max l-inf {budget['linf']:.1f}/255, "
          f"mean l2 {budget['l2_mean']:.1f}/255)")


def cmd_train(args) -> None:
    from poisonbench.bench.jobs import derive_seed, job_hash, runs_root
    from poisonbench.bench.profiles import adhoc_config
    from poisonbench.resolve import check_job
    from poisonbench.training.run import prepare_dir, run_job

    sets = parse_sets(args.set)
    if args.store and (args.attack or {"attack", "attack_params"} & set(sets)):
        raise ConfigError("give --store or an attack (--attack, --set attack...), not both: the store "
                          "already holds the images its attack crafted, and nothing is crafted")
    layers = {"dataset": args.dataset, "model": args.model, "scenario": args.scenario}
    if args.attack:
        layers["attack"] = args.attack
    config = adhoc_config(args.profile, args.family, [layers, sets])
    config.update(table="adhoc", row=config["attack"], column=config["dataset"], trial=0,
                  seed=args.seed, poison_seed=derive_seed("adhoc", args.seed, "poison"),
                  profile=args.profile, fast_dev_run=args.fast_dev_run)
    if args.store:
        from poisonbench.data.store import PoisonStore

        meta = PoisonStore.read_metadata(args.store)
        config["store_sha256"] = meta.get("content_sha256")
        config["attack"] = meta.get("attack", config["attack"])
    check_job(config if not args.store else {**config, "attack": "none", "attack_params": {}},
              "the command-line options")
    job_dir = Path(args.out) if args.out else runs_root() / "adhoc" / job_hash(config)
    if args.dry_run:
        print(yaml.safe_dump(config, sort_keys=True), end="")
        print(f"# job directory: {job_dir}")
        return
    check_home()
    check_writable(job_dir, "--out" if args.out else "the job directory")
    with prepare_dir(job_dir, config):  # refuses a directory that is not a poisonbench job's
        result = run_job(config, job_dir, data_root=args.data_root, store_path=args.store,
                         wandb=no_wandb_in_smoke_run(args), progress_bar=not args.fast_dev_run)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        m = result["metrics"]
        if "test_acc" in m:
            print(f"clean test accuracy {m['test_acc']:.2f}%  ({job_dir / 'result.json'})")
        else:  # integrity: success on the target, accuracy on the rest of the test set
            shown = "  ".join(f"{k} {v:.2f}%" for k, v in m.items() if v is not None)
            print(f"{shown}  ({job_dir / 'result.json'})")


def cmd_inspect(args) -> None:
    from poisonbench.data import load_imageset
    from poisonbench.data.store import PoisonStore

    if args.png:
        check_file_target(args.png, "--png")
    meta = PoisonStore.read_metadata(args.store)
    if "dataset" not in meta:
        raise PoisonbenchError(f"poison store {args.store} has no dataset in its metadata")
    base = load_imageset(meta["dataset"], args.data_root, "train")
    store = PoisonStore.open(args.store, base)
    budget = store.budget  # measured when the store was verified
    for key in sorted(meta):
        print(f"{key:20s} {meta[key]}")
    print(f"{'modified':20s} {budget['modified']} of {len(base)} images")
    print(f"{'max linf':20s} {budget['linf']:.2f}/255 (declared {store.norm} {store.eps * 255:.2f}/255)")
    print(f"{'mean l2':20s} {budget['l2_mean']:.2f}/255  (max {budget['l2_max']:.2f}/255)")
    if args.png:
        from poisonbench.analysis.grid import save_store_grid

        save_store_grid(store, base, args.png)
        print(f"{'grid':20s} {args.png}")


def budget_value(text: str | None, option: str = "--eps") -> float | None:
    """``16/255``, ``0.0627`` or ``36``: a number or a fraction of two numbers."""
    if text is None:
        return None
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{option} expects a number or a fraction such as 16/255, got {text!r}") from None
    return value


def cmd_import(args) -> None:
    from poisonbench.data import load_imageset
    from poisonbench.data.foreign import Budget, default_path, import_store

    budget = Budget(args.norm, budget_value(args.eps))  # a bad budget fails before any file is read
    if args.out:
        check_file_target(args.out, "--out")
    else:
        check_home()
    train = load_imageset(args.dataset, args.data_root, "train")
    test = load_imageset(args.dataset, args.data_root, "test")
    store = import_store(args.format, args.path, train, test, budget)  # verified; nothing written before
    path = store.save(Path(args.out) if args.out else default_path(store))
    target = store.target
    shown = f"l0 {store.eps:g} pixels" if store.norm == "l0" else f"l-inf {store.eps * 255:.4g}/255"
    print(f"{path}  ({store.attack}: {store.budget['modified']} of {len(train)} training images modified, "
          f"max l-inf {store.budget['linf']:.0f}/255 within {shown}; target test image(s) "
          f"{', '.join(map(str, target.target_index))} -> class {target.adversarial_class}"
          f"{'; with a trigger' if 'trigger' in store.extras else ''})")
    print(f"train on it: poisonbench train --dataset {args.dataset} --model MODEL --store {path}")


def cmd_leaderboard(args) -> None:
    from poisonbench.bench import runner
    from poisonbench.bench.jobs import runs_root
    from poisonbench.bench.render import render_all

    check_writable(runner.leaderboards_dir(), "the leaderboards folder")
    if args.suite or args.table:
        plans = runner.plan(runner.resolve_tables(args.suite, args.table), profile=args.profile,
                            trials=None, rows=None, fast_dev_run=False)
        for p in plans:
            if runner.write_leaderboard(p, wandb=args.wandb, console=console(), force=args.force) is None:
                print(f"{p.spec.id}: no results under {runs_root()}")
        render_all(runner.leaderboards_dir(), runs_root(), tables=[])
    else:
        states = render_all(runner.leaderboards_dir(), runs_root(), profile=args.profile, force=args.force)
        for table, state in states.items():
            print(f"{table}: {state.status}")
    print(f"index: {runner.leaderboards_dir() / 'README.md'}")


def cmd_data(args) -> None:
    from poisonbench.data import DATASETS, download
    from poisonbench.files import data_root

    root = data_root(args.data_root)
    if args.action == "fixtures":
        from poisonbench.data.fixtures import write_fixtures

        check_writable(root, "the data root")
        write_fixtures(root)
        print(f"fixture files for cifar10, cifar100 and svhn written under {root}")
        return
    names = args.names or [n for n in DATASETS.names() if n != "digits"]
    for name in names:
        DATASETS.get(name)
    if args.action == "download":
        check_writable(root, "the data root")
    failed = []
    for name in names:
        if args.action == "download":
            download.fetch(name, root)
            print(f"{name}: downloaded and verified under {root}")
        else:
            rows = download.check(name, root)
            for path, status in rows:
                print(f"{name}: {status:14s} {path}")
            if any(status != "ok" for _, status in rows):
                failed.append(name)
    if failed:  # every dataset is reported before the verdict
        raise PoisonbenchError(f"{', '.join(failed)} under {root} failed {'its' if len(failed) == 1 else 'their'} "
                               f"check; fetch with: poisonbench data download {' '.join(failed)} --data-root {root}")


def cmd_job(args) -> None:
    from poisonbench.schema.job_config import check_job_config
    from poisonbench.resolve import check_job
    from poisonbench.training.run import CONFIG_FILE, load_config, run_job_dir

    where = f"job config {Path(args.job_dir) / CONFIG_FILE}"
    config = load_config(Path(args.job_dir))
    check_job_config(config, where)
    check_job(config, where)
    check_home()
    result = run_job_dir(args.job_dir, args.data_root, args.wandb)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        # Every task's metrics (train: test_acc; separability: probe_acc; tsne: points).
        metrics = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in sorted(result["metrics"].items()))
        print(f"{args.job_dir}: {metrics}")


def cmd_pretrain(args) -> None:
    from poisonbench.pretrain import pretrain

    for pair in args.model_param or []:
        if "=" not in pair:
            raise ConfigError(f"--model-param expects key=value, got {pair!r}")
    if args.out:
        check_file_target(args.out, "--out")
    check_home()
    if args.if_missing:
        from poisonbench.pretrain.run import default_path

        target = Path(args.out) if args.out else default_path(args.dataset, args.method, args.model or "small_cnn")
        if target.is_file():
            print(f"{target}  (exists; --if-missing)")
            return
    aux = None
    if args.aux:
        name, _, split = args.aux.partition(":")
        aux = (name, split or "train")
    result = pretrain(args.method, args.dataset, model=args.model, model_params=parse_sets(args.model_param, "--model-param"),
                      epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, out=args.out,
                      data_root=args.data_root, aux=aux, on_start=lambda line: print(line, file=sys.stderr),
                      if_missing=args.if_missing)
    if result is None:  # another process wrote it while this one waited for the file's lock
        print(f"{target}  (exists; --if-missing)")
        return
    epochs = result.params["epochs"]
    print(f"{result.path}  ({result.method} {result.model} on {result.aux_dataset} {result.aux_split}, "
          f"{result.aux_size} images, {epochs} epoch{'s' * (epochs != 1)}; {result.seconds:.1f}s)")


# ---------------------------------------------------------------------- parser
def build_parser() -> Parser:
    p = Parser(prog="poisonbench", description="Benchmark suite for data-poisoning attacks and defenses.")
    p.add_argument("--version", action="version", version=f"poisonbench {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    # --debug after the verb too; SUPPRESS keeps a verb's parser from resetting one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser, metavar="VERB")

    def verb(name: str, **kw) -> Parser:
        return sub.add_parser(name, parents=[common], **kw)

    def data_root(sp):
        sp.add_argument("--data-root", help="dataset folder (default $POISONBENCH_DATA, else $POISONBENCH_HOME/data)")

    sp = verb("list", help="list attacks, defenses, models, datasets, tables, suites, profiles")
    sp.add_argument("kind", nargs="?", choices=["attacks", "defenses", "models", "datasets", "tables", "suites", "profiles"])
    sp.set_defaults(func=cmd_list)

    sp = verb("run", help="run the jobs of a table or suite and render its leaderboards")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", help="suite name (configs/suites)")
    which.add_argument("--table", help="table id (e.g. shortcuts/table3) or path to a spec file")
    sp.add_argument("--profile", help="profile name (default: each table's own)")
    data_root(sp)
    sp.add_argument("--trials", type=positive_int, help="trials per cell (default: the spec's; 1 with --fast-dev-run)")
    sp.add_argument("--rows", nargs="+", metavar="ROW", help="only these row ids")
    sp.add_argument("--fast-dev-run", action="store_true", help="one batch per stage per job; never renders leaderboards")
    sp.add_argument("--dry-run", action="store_true", help="list the jobs and their state, run nothing")
    sp.add_argument("--rerun", action="store_true", help="run done jobs again")
    sp.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    sp.add_argument("--executor", default="local", choices=["local", "slurm"], help="where jobs run (default local)")
    sp.add_argument("--gpus", type=gpus_arg, help="comma-separated GPU ids: jobs run on them in parallel (local executor)")
    sp.add_argument("--jobs-per-device", type=jobs_per_device_arg, default=1, metavar="K",
                    help="worker processes per GPU of --gpus, or on the CPU without it, each running jobs in turn; "
                         "auto: one per core on a CPU (at most 8), one per GPU. Results do not depend on K "
                         "(CPU jobs run with 1 thread each). Default 1 (without --gpus: in this process)")
    sp.add_argument("--slurm", nargs="+", metavar="KEY=VALUE", help="submitit parameters, e.g. slurm_partition=gpu timeout_min=600 gpus_per_node=1")
    sp.set_defaults(func=cmd_run)

    sp = verb("craft", help="craft a poison store (cached by content)")
    sp.add_argument("attack")
    sp.add_argument("--dataset", required=True)
    data_root(sp)
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="attack hyperparameters")
    sp.add_argument("--out", help="also copy the store to this file (not a folder)")
    sp.add_argument("--devices", help="where to craft: cuda:0,cuda:1 (one rank per GPU) or cpu,cpu (CPU ranks); "
                                      "default cuda if a GPU is available, else cpu. Attacks that do not shard "
                                      "craft on the first device")
    sp.set_defaults(func=cmd_craft)

    sp = verb("train", help="train one victim (optionally on a poison store) and measure it")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--store", help="poison store file to train on (default: craft --attack, or clean)")
    sp.add_argument("--attack", help="attack to craft (with the cache); not with --store")
    sp.add_argument("--scenario", default="scratch", choices=list(SCENARIOS))
    sp.add_argument("--profile", default="cpu", help="profile whose training recipe is used (default cpu)")
    sp.add_argument("--family", default="shortcuts", help="profile family (paper) of the recipe (default shortcuts)")
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3 attack_params.eps=0.03")
    data_root(sp)
    sp.add_argument("--out", help="job directory (default under $POISONBENCH_HOME/runs/adhoc)")
    sp.add_argument("--fast-dev-run", action="store_true")
    sp.add_argument("--dry-run", action="store_true", help="print the resolved config and job directory, run nothing")
    sp.add_argument("--wandb", action="store_true")
    sp.set_defaults(func=cmd_train)

    sp = verb("inspect", help="verify a poison store and print its metadata and measured budget")
    sp.add_argument("store")
    data_root(sp)
    sp.add_argument("--png", help="save a grid of clean / poisoned / amplified perturbation images")
    sp.set_defaults(func=cmd_inspect)

    sp = verb("import", help="read poisons made elsewhere (jht, dp_external) into a verified poison store")
    sp.add_argument("format", choices=["jht", "dp_external"],
                    help="jht: a Just How Toxic poison folder; dp_external: a data-poisoning external package "
                         "(e.g. MetaPoison's premade poisons)")
    sp.add_argument("path", help="the jht folder (poisons.pickle, base_indices.pickle, target.pickle) or the "
                                 "dp_external pickle file")
    sp.add_argument("--dataset", required=True, help="the dataset the poisons were made on (train and test splits)")
    data_root(sp)
    sp.add_argument("--norm", choices=["linf", "l0"], default="linf", help="budget norm (default linf)")
    sp.add_argument("--eps", help="budget: l-inf in pixel units, a number or fraction (default 16/255); "
                                  "l0 a pixel count (default the patch's area)")
    sp.add_argument("--out", help="store file (default $POISONBENCH_HOME/stores/import/<format>-<key>.safetensors)")
    sp.set_defaults(func=cmd_import)

    sp = verb("leaderboard", help="render leaderboards from the results on disk")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--suite")
    which.add_argument("--table")
    sp.add_argument("--profile")
    sp.add_argument("--wandb", action="store_true")
    sp.add_argument("--force", action="store_true",
                    help="replace a leaderboard that holds more results than this home has (a partial run)")
    sp.set_defaults(func=cmd_leaderboard)

    sp = verb("data", help="download, check (md5) or write test fixtures of datasets")
    sp.add_argument("action", choices=["download", "check", "fixtures"])
    sp.add_argument("names", nargs="*", help="datasets (default: all downloadable)")
    data_root(sp)
    sp.set_defaults(func=cmd_data)

    sp = verb("job", help="run one prepared job by its directory (what executors launch)")
    sp.add_argument("job_dir")
    data_root(sp)
    sp.add_argument("--wandb", action="store_true")
    sp.set_defaults(func=cmd_job)

    sp = verb("pretrain", help="pre-train a backbone on the auxiliary data of a dataset (pre-trained-extractor defense)")
    sp.add_argument("method", choices=["simclr", "supervised"])
    sp.add_argument("--dataset", required=True, help="the dataset to be defended; pre-training uses its auxiliary data")
    sp.add_argument("--model", help="model name (default: the dataset's cpu recipe, digits: small_cnn with pool=1)")
    sp.add_argument("--model-param", nargs="+", metavar="KEY=VALUE", help="model parameters, e.g. pool=1 width=32")
    sp.add_argument("--aux", metavar="DATASET[:SPLIT]", help="auxiliary data (default: cifar100 for cifar10 and the reverse, digits:aux for digits)")
    sp.add_argument("--epochs", type=positive_int, help="epochs (default: the method's recipe for the dataset)")
    sp.add_argument("--batch-size", type=positive_int, help="batch size (default: the method's recipe for the dataset)")
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--out", help="backbone file (default $POISONBENCH_HOME/backbones/<dataset>_<method>_<model>.safetensors)")
    sp.add_argument("--if-missing", action="store_true", help="do nothing when the backbone file exists")
    data_root(sp)
    sp.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # wandb's banners, run summaries and sync hints are not this command's output; it
    # reads the variable when a run starts, so it is set before any verb runs.
    os.environ.setdefault("WANDB_SILENT", "true")
    # Signal handlers can only be set in the main thread (a test may call main elsewhere).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS} if main_thread else {}
    try:
        args.func(args)
    except PoisonbenchError as err:
        if getattr(args, "debug", False):
            raise
        print(f"poisonbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (Stopped, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        print(f"poisonbench: {args.verb} stopped by {signal.Signals(signum).name}; "
              f"{RESUME.get(args.verb, 'run the same command again to go on')}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
