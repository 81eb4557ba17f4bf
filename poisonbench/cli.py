"""The ``poisonbench`` command: list | run | craft | train | inspect | leaderboard | data | job.

Bad input (unknown names, wrong config keys, missing data, broken stores) prints one
sentence and exits with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from poisonbench import __version__
from poisonbench.errors import ConfigError, PoisonbenchError
from poisonbench.bench.spec import SCENARIOS

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_sets(pairs: list[str] | None) -> dict:
    """``key=value`` pairs (dotted keys nest, values are YAML) → a nested dict."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: {raw!r} is not a valid value") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is set to a value and cannot also hold keys")
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


def console():
    from rich.console import Console

    return Console()


# ----------------------------------------------------------------------- verbs
def cmd_list(args) -> None:
    from poisonbench.attacks import ATTACKS
    from poisonbench.bench.spec import profile_names, suite_names, table_ids
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

    specs = runner.resolve_tables(args.suite, args.table)
    plans = runner.plan(specs, profile=args.profile, trials=args.trials, rows=args.rows,
                        fast_dev_run=args.fast_dev_run)
    out = console()
    if args.dry_run:
        runner.show_plan(plans, out)
        return
    gpus = args.gpus.split(",") if args.gpus else None
    slurm = parse_sets(args.slurm) if args.executor == "slurm" else None
    runner.run(plans, rerun=args.rerun, executor=args.executor, data_root=args.data_root,
               wandb=args.wandb, gpus=gpus, slurm=slurm, render=not args.fast_dev_run, console=out)


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
    from poisonbench.bench.spec import adhoc_config
    from poisonbench.training.job import prepare_dir, run_job

    layers = {"dataset": args.dataset, "model": args.model, "scenario": args.scenario}
    if args.attack:
        layers["attack"] = args.attack
    config = adhoc_config(args.profile, args.family, [layers, parse_sets(args.set)])
    config.update(table="adhoc", row=config["attack"], column=config["dataset"], trial=0,
                  seed=args.seed, poison_seed=derive_seed("adhoc", args.seed, "poison"),
                  profile=args.profile, fast_dev_run=args.fast_dev_run)
    if args.store:
        from poisonbench.data.store import PoisonStore

        meta = PoisonStore.read_metadata(args.store)
        config["store_sha256"] = meta.get("content_sha256")
        config["attack"] = meta.get("attack", config["attack"])
    job_dir = Path(args.out) if args.out else runs_root() / "adhoc" / job_hash(config)
    with prepare_dir(job_dir, config):  # refuses a directory that is not a poisonbench job's
        result = run_job(config, job_dir, data_root=args.data_root, store_path=args.store,
                         wandb=args.wandb, progress_bar=not args.fast_dev_run)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        m = result["metrics"]
        print(f"clean test accuracy {m['test_acc']:.2f}%  ({job_dir / 'result.json'})")


def cmd_inspect(args) -> None:
    from poisonbench.data import load_imageset
    from poisonbench.data.store import PoisonStore

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


def cmd_leaderboard(args) -> None:
    from poisonbench.bench import runner
    from poisonbench.bench.jobs import runs_root
    from poisonbench.bench.render import render_all

    if args.suite or args.table:
        plans = runner.plan(runner.resolve_tables(args.suite, args.table), profile=args.profile,
                            trials=None, rows=None, fast_dev_run=False)
        for p in plans:
            if runner.write_leaderboard(p, wandb=args.wandb, console=console()) is None:
                print(f"{p.spec.id}: no results under {runs_root()}")
        render_all(runner.leaderboards_dir(), runs_root(), tables=[])
    else:
        states = render_all(runner.leaderboards_dir(), runs_root(), profile=args.profile)
        for table, state in states.items():
            print(f"{table}: {state.status}")
    print(f"index: {runner.leaderboards_dir() / 'README.md'}")


def cmd_data(args) -> None:
    from poisonbench.data import DATASETS, download
    from poisonbench.files import data_root

    root = data_root(args.data_root)
    if args.action == "fixtures":
        from poisonbench.data.fixtures import write_fixtures

        write_fixtures(root)
        print(f"fixture files for cifar10, cifar100 and svhn written under {root}")
        return
    names = args.names or [n for n in DATASETS.names() if n != "digits"]
    for name in names:
        DATASETS.get(name)
        if args.action == "download":
            download.fetch(name, root)
            print(f"{name}: downloaded and verified under {root}")
        else:
            rows = download.check(name, root)
            for path, status in rows:
                print(f"{name}: {status:14s} {path}")
            if any(status != "ok" for _, status in rows):
                raise PoisonbenchError(f"{name} under {root} failed its check; fetch it with: poisonbench data download {name} --data-root {root}")


def cmd_job(args) -> None:
    from poisonbench.training.job import run_job_dir

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
    result = pretrain(args.method, args.dataset, model=args.model, model_params=parse_sets(args.model_param),
                      epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, out=args.out,
                      data_root=args.data_root, aux=aux, on_start=lambda line: print(line, file=sys.stderr))
    epochs = result.params["epochs"]
    print(f"{result.path}  ({result.method} {result.model} on {result.aux_dataset} {result.aux_split}, "
          f"{result.aux_size} images, {epochs} epoch{'s' * (epochs != 1)}; {result.seconds:.1f}s)")


# ---------------------------------------------------------------------- parser
def build_parser() -> Parser:
    p = Parser(prog="poisonbench", description="Benchmark suite for data-poisoning attacks and defenses.")
    p.add_argument("--version", action="version", version=f"poisonbench {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser, metavar="VERB")

    def data_root(sp):
        sp.add_argument("--data-root", help="dataset folder (default $POISONBENCH_DATA or ~/.cache/poisonbench/data)")

    sp = sub.add_parser("list", help="list attacks, defenses, models, datasets, tables, suites, profiles")
    sp.add_argument("kind", nargs="?", choices=["attacks", "defenses", "models", "datasets", "tables", "suites", "profiles"])
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("run", help="run the jobs of a table or suite and render its leaderboards")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", help="suite name (configs/suites)")
    which.add_argument("--table", help="table id (e.g. shortcuts/table3) or path to a spec file")
    sp.add_argument("--profile", help="profile name (default: each table's own)")
    data_root(sp)
    sp.add_argument("--trials", type=int, help="trials per cell (default: the spec's; 1 with --fast-dev-run)")
    sp.add_argument("--rows", nargs="+", metavar="ROW", help="only these row ids")
    sp.add_argument("--fast-dev-run", action="store_true", help="one batch per stage per job; never renders leaderboards")
    sp.add_argument("--dry-run", action="store_true", help="list the jobs and their state, run nothing")
    sp.add_argument("--rerun", action="store_true", help="run done jobs again")
    sp.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    sp.add_argument("--executor", default="local", choices=["local", "slurm"], help="where jobs run (default local)")
    sp.add_argument("--gpus", help="comma-separated GPU ids: one job per GPU in parallel (local executor)")
    sp.add_argument("--slurm", nargs="+", metavar="KEY=VALUE", help="submitit parameters, e.g. slurm_partition=gpu timeout_min=600 gpus_per_node=1")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("craft", help="craft a poison store (cached by content)")
    sp.add_argument("attack")
    sp.add_argument("--dataset", required=True)
    data_root(sp)
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="attack hyperparameters")
    sp.add_argument("--out", help="also copy the store to this file")
    sp.add_argument("--devices", help="where to craft: cuda:0,cuda:1 (one rank per GPU) or cpu,cpu (CPU ranks); "
                                      "default cuda if a GPU is available, else cpu. Attacks that do not shard "
                                      "craft on the first device")
    sp.set_defaults(func=cmd_craft)

    sp = sub.add_parser("train", help="train one victim (optionally on a poison store) and measure it")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--store", help="poison store file to train on (default: craft --attack, or clean)")
    sp.add_argument("--attack", help="attack to craft (with the cache) when no --store is given")
    sp.add_argument("--scenario", default="scratch", choices=list(SCENARIOS))
    sp.add_argument("--profile", default="cpu", help="profile whose training recipe is used (default cpu)")
    sp.add_argument("--family", default="shortcuts", help="profile family (paper) of the recipe (default shortcuts)")
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=3 attack_params.eps=0.03")
    data_root(sp)
    sp.add_argument("--out", help="job directory (default under $POISONBENCH_HOME/runs/adhoc)")
    sp.add_argument("--fast-dev-run", action="store_true")
    sp.add_argument("--wandb", action="store_true")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("inspect", help="verify a poison store and print its metadata and measured budget")
    sp.add_argument("store")
    data_root(sp)
    sp.add_argument("--png", help="save a grid of clean / poisoned / amplified perturbation images")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("leaderboard", help="render leaderboards from the results on disk")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--suite")
    which.add_argument("--table")
    sp.add_argument("--profile")
    sp.add_argument("--wandb", action="store_true")
    sp.set_defaults(func=cmd_leaderboard)

    sp = sub.add_parser("data", help="download, check (md5) or write test fixtures of datasets")
    sp.add_argument("action", choices=["download", "check", "fixtures"])
    sp.add_argument("names", nargs="*", help="datasets (default: all downloadable)")
    data_root(sp)
    sp.set_defaults(func=cmd_data)

    sp = sub.add_parser("job", help="run one prepared job by its directory (what executors launch)")
    sp.add_argument("job_dir")
    data_root(sp)
    sp.add_argument("--wandb", action="store_true")
    sp.set_defaults(func=cmd_job)

    sp = sub.add_parser("pretrain", help="pre-train a backbone on the auxiliary data of a dataset (pre-trained-extractor defense)")
    sp.add_argument("method", choices=["simclr", "supervised"])
    sp.add_argument("--dataset", required=True, help="the dataset to be defended; pre-training uses its auxiliary data")
    sp.add_argument("--model", help="model name (default: the dataset's cpu recipe, digits: small_cnn with pool=1)")
    sp.add_argument("--model-param", nargs="+", metavar="KEY=VALUE", help="model parameters, e.g. pool=1 width=32")
    sp.add_argument("--aux", metavar="DATASET[:SPLIT]", help="auxiliary data (default: cifar100 for cifar10 and the reverse, digits:aux for digits)")
    sp.add_argument("--epochs", type=int, help="epochs (default: the method's recipe for the dataset)")
    sp.add_argument("--batch-size", type=int, help="batch size (default: the method's recipe for the dataset)")
    sp.add_argument("--seed", type=seed_arg, default=0)
    sp.add_argument("--out", help="backbone file (default $POISONBENCH_HOME/backbones/<dataset>_<method>_<model>.safetensors)")
    sp.add_argument("--if-missing", action="store_true", help="do nothing when the backbone file exists")
    data_root(sp)
    sp.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PoisonbenchError as err:
        if args.debug:
            raise
        print(f"poisonbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("poisonbench: interrupted; finished jobs are kept, run again to go on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
