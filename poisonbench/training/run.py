"""One job: craft (or fetch from the cache) the poison store, train the victim, measure
it, and write ``result.json`` last and atomically, so its presence means done.

The job is a function of its resolved config (docs/architecture.md); the data root
and the job directory are where it runs, never part of what it is.

The defense (``defense``, ``defense_params``; ``poisonbench.defenses``) is built first,
so a bad name or parameter fails before any work. Its training-set filter runs on the
poisoned training set (what a defender receives) before the trainer sees it, and its
``prepare_model`` on the victim as built; the per-batch and per-step hooks run inside
``VictimModule``. The scenario routes the rest: ``scratch``, ``finetune`` and
``transfer`` train with Lightning; ``linear_eval`` extracts features once and fits an
L-BFGS linear classifier (``poisonbench.fitting.linear_eval``), with no curve.

A defense that acts inside training (its per-batch or per-step hook) also trains what
the victim's training depends on: the base model of ``finetune`` and ``transfer``
(``base_model.defense: job``, the default) and an adaptive attacker's surrogate, which
gets it as ``AttackInput.defense`` (a factory of fresh hooks: the layers below know no
defense). A filter or a replaced network acts on the victim's data or network alone.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from poisonbench import provenance
from poisonbench.attacks import ATTACKS, craft_cached
from poisonbench.attacks.base import AttackInput, VictimDefense, VictimSpec, check_declared, craft_cost
from poisonbench.schema.job_config import CONFIG_FILE, check_scenario
from poisonbench.schema.job_dir import Claim, claim, clear_job_dir, inherited_claim, make_job_dir
from poisonbench.schema.result import RESULT_FILE, RESULT_FORMAT_VERSION, metric_problem
from poisonbench.data import load_imageset
from poisonbench.data.imageset import ImageSet
from poisonbench.data.module import PoisonedDataModule, select_poisoned
from poisonbench.data.store import PoisonStore
from poisonbench.defenses import Defense, build_defense
from poisonbench.errors import JobError
from poisonbench.files import write_json, write_text
from poisonbench.models import build_model
from poisonbench.threads import CPU_JOB_THREADS, torch_threads
from poisonbench.pretrain.auxiliary import auxiliary_dataset
from poisonbench.fitting.base_model import AUXILIARY, JOB_DEFENSE, base_model, base_model_config, training_data
from poisonbench.fitting.fit import fit
from poisonbench.fitting.linear_eval import linear_eval
from poisonbench.fitting.targets import target_metrics, validation_set
from poisonbench.fitting.trainer import CHECKPOINT_DIR, quiet_lightning

# --fast-dev-run checks that a job runs end to end, not what it measures: one batch of
# at most this many images per stage keeps the smoke run over every table in minutes.
FAST_DEV_BATCH = 8


def prepare_dir(job_dir: str | Path, config: dict, keep: tuple[str, ...] = (),
                claimed: Claim | None = None) -> Claim:
    """Make ``job_dir`` ready for a run of the job with ``config`` and return this
    process's claim of it: hold the claim (``with``) until the job is done.

    The directory is created or adopted only when it is provably a poisonbench job
    directory (``make_job_dir``: a foreign one is refused, nothing touched); it is
    claimed (``claimed``: the caller's claim, else one an executor handed down, else
    a new one; ``JobBusyError`` when another process runs the job); then what an
    earlier attempt left is cleared, except the names in ``keep``, a finished
    result, which stays until the new one replaces it, and, while there is none, the
    training checkpoint the job resumes from (``fitting.fit``).

    DDP workers re-execute the launching command with LOCAL_RANK set; they run inside
    their rank-0 process's claim and must not touch its directory.
    """
    job_dir = Path(job_dir)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return Claim(job_dir, None)
    make_job_dir(job_dir, config, write_config=False)
    held = claimed or inherited_claim(job_dir) or claim(job_dir)
    try:
        write_text(job_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=True))
        if not (job_dir / RESULT_FILE).exists():  # an unfinished attempt: resume, not restart
            keep = (*keep, CHECKPOINT_DIR)
        clear_job_dir(job_dir, keep)
    except BaseException:
        if claimed is None:
            held.release()
        raise
    return held


def load_config(job_dir: Path) -> dict:
    """The resolved config a job directory was prepared with."""
    path = Path(job_dir) / CONFIG_FILE
    if not path.is_file():
        raise JobError(f"{job_dir} is not a job directory: it has no {CONFIG_FILE}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise JobError(f"{path} is not valid YAML") from None
    if not isinstance(config, dict) or not {"train", "dataset", "model", "attack", "seed"} <= set(config):
        raise JobError(f"{path} is not a job config of this poisonbench version")
    return config


def run_job_dir(job_dir: str | Path, data_root: str | None = None, wandb: bool = False) -> dict:
    """Run the job prepared in ``job_dir`` (what ``poisonbench job DIR`` and slurm do),
    starting from its config alone: what an earlier attempt left is removed, a finished
    result only when the new one is written."""
    job_dir = Path(job_dir)
    config = load_config(job_dir)
    with prepare_dir(job_dir, config, keep=("job.log",)):  # the launcher writes job.log
        return run_job(config, job_dir, data_root=data_root, wandb=wandb)


def compute_device(train: dict) -> torch.device:
    """Where work outside the Lightning trainer runs (filters, feature extraction): the
    GPU when there is one and the profile's accelerator allows it."""
    accelerator = str(train.get("accelerator", "auto"))
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if on_cuda else "cpu")


def filter_training_set(defense: Defense, datamodule: PoisonedDataModule, config: dict,
                        device: torch.device, data_root: str | Path | None = None) -> dict | None:
    """Apply the defense's filter to the datamodule's poisoned training set in place.

    The filter is told the exact poison count (robuster §5.2), never which samples they
    are, and, when the job starts from a base model, how to get it. Returns ``None`` when
    the defense keeps everything, else what ``result.json`` records as
    ``defense.filter``: ``kept`` and ``removed`` samples, ``poisons`` in the set,
    ``removed_poisons`` among the removed, ``precision`` (removed_poisons / removed) and
    ``recall`` (removed_poisons / poisons) as fractions (``None`` where the denominator
    is 0), and ``filter_s``, the seconds of the filter (its model's training included
    unless cached).
    """
    start = time.perf_counter()
    datamodule.setup("fit")  # builds the poisoned training set; the trainer's setup() keeps it
    train = datamodule.train_set
    store = datamodule.store
    if store is None or datamodule.drop_poisoned or store.index.numel() == 0:  # dropped, not poisoned: none
        poisons = torch.zeros(0, dtype=torch.int64)
    else:  # the store's indices as applied: positions in the training set
        subset = select_poisoned(store, len(datamodule.base), datamodule.ratio)
        poisons = store.index if subset is None else store.index[subset]

    def held_base_model():
        return _from_base_model(config, datamodule.base, dict(config["train"]), False, data_root)[0]

    kept = defense.filter_training_set(train.images, train.labels, num_classes=train.num_classes,
                                       seed=int(config["seed"]), device=device, config=config,
                                       poison_count=int(poisons.numel()),
                                       base_model=held_base_model if config.get("base_model") is not None else None)
    if kept is None:
        return None
    kept = torch.as_tensor(kept).cpu()
    n = len(train)
    valid = (kept.dtype == torch.int64 and kept.ndim == 1 and kept.numel() > 0
             and int(kept.min()) >= 0 and int(kept.max()) < n and kept.unique().numel() == kept.numel())
    if not valid:  # a defense's bug, not a user's: say what came back
        raise ValueError(f"defense {defense.name!r} must return unique int64 indices in [0, {n}) "
                         f"from filter_training_set, got {kept.dtype} {tuple(kept.shape)}")
    kept = kept.sort().values
    datamodule.train_set = ImageSet(train.images.index_select(0, kept), train.labels.index_select(0, kept),
                                    train.classes, train.name, train.split)
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    m, p = n - int(kept.numel()), int(poisons.numel())
    caught = int(removed[poisons].sum())
    return {"kept": int(kept.numel()), "removed": m, "poisons": p, "removed_poisons": caught,
            "precision": caught / m if m else None, "recall": caught / p if p else None,
            "filter_s": round(time.perf_counter() - start, 3)}


def run_job(config: dict, job_dir: Path, *, data_root: str | Path | None = None,
            store_path: str | Path | None = None, wandb: bool = False,
            progress_bar: bool = False) -> dict:
    """Run one job and return its result (also written to ``job_dir/result.json``); on
    the CPU with ``CPU_JOB_THREADS`` threads wherever it runs (``poisonbench.threads``)."""
    on_cpu = compute_device(dict(config["train"])).type == "cpu"
    with torch_threads(CPU_JOB_THREADS) if on_cpu else contextlib.nullcontext():
        return _run_job(config, job_dir, data_root=data_root, store_path=store_path, wandb=wandb,
                        progress_bar=progress_bar)


def _run_job(config: dict, job_dir: Path, *, data_root: str | Path | None = None,
            store_path: str | Path | None = None, wandb: bool = False,
            progress_bar: bool = False) -> dict:
    """Run one job and return its result (also written to ``job_dir/result.json``)."""
    job_dir = Path(job_dir)
    train_cfg = dict(config["train"])
    if not progress_bar:
        quiet_lightning()
    L.seed_everything(int(config["seed"]), workers=True, verbose=False)
    scenario = config.get("scenario", "scratch")
    check_scenario(config)
    # Unknown names and bad parameters fail before any work is done.
    defense = build_defense(config.get("defense", "none"), config.get("defense_params"))

    base = load_imageset(config["dataset"], data_root, "train")
    test = load_imageset(config["dataset"], data_root, "test")
    craft_device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = bool(config.get("fast_dev_run"))
    base_victim, base_info = None, None
    if store_path is not None:
        store, craft_s = check_declared(PoisonStore.open(store_path, base, test), base), 0.0
    else:
        attack = ATTACKS.get(config["attack"])
        attack_params = dict(config.get("attack_params") or {})
        if fast:  # the same code path at a smoke run's cost (a few steps, a tiny crafting model)
            attack_params = {**attack_params, **attack.smoke}
        data = base
        if attack.integrity and config.get("base_model") is not None:  # the attacker knows the base model
            base_victim, train_cfg, base_info = _from_base_model(config, base, train_cfg, progress_bar, data_root)
        if attack.integrity:  # the trial's target, from its seed alone (paired across columns)
            target = attack.draw_target(base, test, int(config["poison_seed"]), attack.params(attack_params))
            victim = VictimSpec(config["model"], dict(config.get("model_params") or {}), train_cfg, scenario,
                                config.get("defense", "none"), dict(config.get("defense_params") or {}),
                                _victim_base_model(config))
            data = AttackInput(base, int(config["poison_seed"]), craft_device, test=test, target=target,
                               victim=victim, base_weights=Path(base_info["path"]) if base_info else None,
                               defense=training_defense(config))
        store, craft_s = craft_cached(config["attack"], data, attack_params,
                                      int(config["poison_seed"]), craft_device, progress=progress_bar)
    if config.get("task", "train") != "train":
        return _analysis_job(config, job_dir, base, store, craft_s, fast, wandb)

    batch_size = min(int(train_cfg["batch_size"]), FAST_DEV_BATCH) if fast else int(train_cfg["batch_size"])
    if wandb and craft_s > 0:
        from poisonbench.tracking import log_craft

        log_craft(config, job_dir, {"craft_s": craft_s, **store.budget})
    sizes = {"batch_size": batch_size, **({"eval_batch_size": FAST_DEV_BATCH} if fast else {})}
    target = store.target
    if target is not None:  # integrity: the targets leave the set that accuracy is measured on
        evaluated = validation_set(test, target.target_index)
    else:
        evaluated = test
    datamodule = PoisonedDataModule(base, evaluated, store, ratio=float(config.get("ratio", 1.0)),
                                    seed=int(config["seed"]), drop_poisoned=bool(config.get("drop_poisoned")),
                                    resident=train_cfg.get("resident_data", "auto"), **sizes)
    device = compute_device(train_cfg)
    filtered = filter_training_set(defense, datamodule, config, device, data_root)
    model_params = dict(config.get("model_params") or {})
    model = build_model(config["model"], base.num_classes, **model_params)
    model = defense.prepare_model(model, base.num_classes, config=config,
                                  data_root=None if data_root is None else str(data_root))
    if base_victim is not None:  # finetune and transfer start from the base model
        model = base_victim
    elif config.get("base_model") is not None:
        model, train_cfg, base_info = _from_base_model(config, base, train_cfg, progress_bar, data_root)

    if scenario == "linear_eval":
        outcome, write = _linear_eval(model, datamodule, config, device, fast), True
    else:
        outcome, write = _train(model, datamodule, config, train_cfg, defense, job_dir, fast, wandb, progress_bar)
    if target is not None:
        adversarial = target.adversarial_class
        metrics = outcome["metrics"]
        metrics["val_acc"] = metrics.pop("test_acc")
        metrics.update(target_metrics(model, store, test, adversarial, next(model.parameters()).device))

    result = {
        "format_version": RESULT_FORMAT_VERSION,
        "job": job_dir.name,
        **{k: config.get(k) for k in ("table", "row", "column", "trial", "seed", "poison_seed")},
        "config": config,
        "metrics": outcome["metrics"],
        "curves": outcome["curves"],
        "timings": {"craft_s": round(craft_s, 3), **outcome["timings"]},
        "store": {"path": str(store.path) if store.path else None, "attack": store.attack,
                  "budget": store.budget if store.index.numel() else None,
                  "craft_cost": craft_cost(store.path)},
        "defense": {**defense.describe(), "filter": filtered},
        **({"target": {"target_index": list(target.target_index),
                       "target_class": int(test.labels[target.target_index[0]]),
                       "adversarial_class": target.adversarial_class}} if target is not None else {}),
        **({"base_model": base_info} if base_info else {}),
        "hardware": outcome["hardware"],
        **({"training": outcome["training"]} if "training" in outcome else {}),
        "versions": provenance.versions(),
        "finished_at": provenance.now(),
    }
    if write:
        write_result(job_dir, result)
    if wandb:
        import wandb as wandb_lib

        if scenario == "linear_eval":
            from poisonbench.tracking import wandb_logger

            wandb_logger(config, job_dir, job_type="train").log_metrics(
                {"test/acc": result["metrics"]["test_acc"], "train/acc": result["metrics"]["train_acc"]})
        wandb_lib.finish()
    return result


def write_result(job_dir: Path, result: dict) -> None:
    """Write ``result.json`` (replacing an earlier result in one rename) unless a metric
    lies outside its range: such a result would only be refused when read."""
    for name, value in result["metrics"].items():
        problem = metric_problem(name, value)
        if problem:
            raise JobError(f"job {job_dir} measured {problem}; no result was written")
    write_json(job_dir / RESULT_FILE, result)
    shutil.rmtree(job_dir / CHECKPOINT_DIR, ignore_errors=True)  # done: nothing left to resume


def _analysis_job(config: dict, job_dir: Path, base: ImageSet, store: PoisonStore, craft_s: float,
                  fast: bool, wandb: bool) -> dict:
    """A job whose task analyses the perturbations (``poisonbench.analysis.tasks``)."""
    from poisonbench.analysis.tasks import run_task

    metrics, timings, files = run_task(config, base, store, job_dir, int(config["seed"]), fast=fast)
    result = {
        "format_version": RESULT_FORMAT_VERSION,
        "job": job_dir.name,
        **{k: config.get(k) for k in ("table", "row", "column", "trial", "seed", "poison_seed")},
        "config": config,
        "metrics": metrics,
        "curves": {"epoch": [], "test_acc": []},
        "timings": {"craft_s": round(craft_s, 3), **timings},
        "store": {"path": str(store.path) if store.path else None, "attack": store.attack,
                  "budget": store.budget if store.index.numel() else None,
                  "craft_cost": craft_cost(store.path)},
        "files": files,
        "hardware": provenance.hardware("cpu"),
        "versions": provenance.versions(),
        "finished_at": provenance.now(),
    }
    write_result(job_dir, result)
    if wandb:
        import wandb as wandb_lib

        from poisonbench.tracking import wandb_logger

        wandb_logger(config, job_dir, job_type="analysis").log_metrics(metrics)
        wandb_lib.finish()
    return result


def training_defense(config: dict) -> VictimDefense | None:
    """The job's defense as an adaptive attacker trains with it, or None where it does
    not act inside training; each call of its ``hooks`` builds a fresh defense, so the
    surrogate's defense state (counters, random streams) is not the victim's."""
    name, params = config.get("defense") or "none", dict(config.get("defense_params") or {})
    if not build_defense(name, params).acts_in_training():
        return None
    return VictimDefense(name, params, functools.partial(build_defense, name, params))


def base_model_settings(config: dict) -> dict:
    """The job's ``base_model`` settings, ``defense: job`` resolved: the job's defense
    where it acts inside training (ROBUSTER.md: "With a defense on, the base model is
    trained with it"), else none."""
    hooks = training_defense(config)
    return base_model_config(config["base_model"], "the job config",
                             job_defense=(hooks.name, hooks.params) if hooks is not None else None)


def _victim_base_model(config: dict) -> dict | None:
    """The base model as an attacker's store key names it: as written, plus the defense
    that ``defense: job`` stood for where that is one (so an undefended job's key is the
    one it always had, and a defended job's base model keys its own stores)."""
    written = config.get("base_model")
    if written is None or written.get("defense", JOB_DEFENSE) != JOB_DEFENSE:
        return written
    settings = base_model_settings(config)
    if settings["defense"] == "none":
        return written
    return {**written, "defense": settings["defense"], "defense_params": settings["defense_params"]}


def _from_base_model(config: dict, base: ImageSet, train_cfg: dict, progress: bool,
                     data_root: str | Path | None = None) -> tuple:
    """The victim as its base model (``poisonbench.fitting.base_model``), the recipe it is
    trained on with (fine-tuning: the lr × ``finetune_lr``), and what result.json records."""
    settings = base_model_settings(config)
    hooks = None if settings["defense"] == "none" else build_defense(settings["defense"], settings["defense_params"])
    params = dict(config.get("model_params") or {})
    recipe = dict(settings["recipe"] or train_cfg)
    if config.get("fast_dev_run"):  # a smoke base model, cached apart from the real one
        recipe["fast_dev_run"] = True
    auxiliary = auxiliary_dataset(config["dataset"]) if settings["dataset"] == AUXILIARY else None
    data = training_data(settings, base, data_root, auxiliary)
    model, seconds, path = base_model(lambda: build_model(config["model"], base.num_classes, **params), data,
                                      config["model"], params, recipe, settings,
                                      hooks=hooks, progress=progress)
    if config.get("scenario") == "finetune":
        train_cfg = {**train_cfg, "lr": train_cfg["lr"] * settings["finetune_lr"]}
    return model, train_cfg, {"path": str(path) if path else None, "train_s": round(seconds, 3),
                              "defense": settings["defense"]}


def _train(model, datamodule: PoisonedDataModule, config: dict, train_cfg: dict, defense: Defense, job_dir: Path,
           fast: bool, wandb: bool, progress_bar: bool) -> tuple[dict, bool]:
    """The Lightning scenarios: fit, then test; returns the result's parts and whether
    this process writes the result (rank 0)."""
    extra_loggers = []
    if wandb:
        from poisonbench.tracking import wandb_logger

        extra_loggers.append(wandb_logger(config, job_dir, job_type="train"))
    fitted = fit(model, datamodule, train_cfg, scenario=config.get("scenario", "scratch"),
                 hooks=defense, job_dir=job_dir, fast_dev_run=fast, loggers=extra_loggers, progress=progress_bar)
    module, trainer, train_s = fitted.module, fitted.trainer, fitted.seconds
    train_acc = trainer.callback_metrics.get("train/acc")  # before test() resets them
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    outcome = {
        "metrics": {
            "test_acc": float(tested["test/acc"]),
            "train_acc": float(train_acc) if train_acc is not None else None,
        },
        "curves": {"epoch": [e for e, _ in module.curve], "test_acc": [a for _, a in module.curve]},
        "timings": {"train_s": round(train_s, 3)},
        "hardware": provenance.hardware(module.device.type) | {"processes": trainer.world_size},
        "training": fitted.training,
    }
    return outcome, trainer.is_global_zero


def _linear_eval(model, datamodule: PoisonedDataModule, config: dict, device: torch.device,
                 fast: bool) -> dict:
    """The ``linear_eval`` scenario: features once, an L-BFGS linear classifier, no curve."""
    datamodule.setup("fit")
    train, test = datamodule.train_set, datamodule.test_set
    if fast:  # one small batch of each set, like Lightning's fast_dev_run
        train, test = _head(train, FAST_DEV_BATCH), _head(test, FAST_DEV_BATCH)
    fitted = linear_eval(model, train, test, seed=int(config["seed"]), device=device)
    return {
        "metrics": {"test_acc": fitted.test_acc, "train_acc": fitted.train_acc},
        "curves": {"epoch": [], "test_acc": []},
        "timings": {"extract_s": round(fitted.extract_s, 3), "fit_s": round(fitted.fit_s, 3)},
        "hardware": provenance.hardware(device.type) | {"processes": 1},
    }


def _head(data: ImageSet, n: int) -> ImageSet:
    return ImageSet(data.images[:n], data.labels[:n], data.classes, data.name, data.split)
