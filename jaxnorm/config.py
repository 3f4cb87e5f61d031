"""Sweep configurations: plain data, validated at the edge.

A sweep trains one model per (P, seed) "replica" (paper Sec. 3.1): a random subset of P
training examples, its own initialization and data order, for a fixed number of epochs,
logging the test error against the spectral complexity (Eq. 2) along the way.

A config is a flat TOML table (read with :mod:`tomllib`); ``sweeps/`` holds one file per
(arch, dataset) pair of the paper and :func:`paper_defaults` returns the same values, so
that ``python -m jaxnorm.sweep --arch cnn --dataset mnist`` reproduces Appendix E without a
file. Every key, its meaning and its default is in :data:`FIELDS`; unknown keys and bad values
raise a ``ValueError`` that names the allowed ones.

Appendix E fixes: Adam for CNN and ResNet, AdamW with zero weight decay for ViT, lr 1e-3,
500 epochs (CNN) or 1000 (ResNet, ViT), and the P grids below. It does not give the batch
size nor the number of seeds; our choices (64 for the CNN, 128 for ResNet/ViT; 5 seeds) are
marked as such in :func:`paper_defaults`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ARCHS = ("cnn", "resnet", "vit")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
OPTIMIZERS = ("adam", "adamw")
EVAL_SCHEDULES = ("every", "log", "log_steps")
SIZES = ("paper", "small")
CONV_IMPLS = ("auto", "xla", "canonical", "patches", "im2col", "phase")  # = jaxnorm.models.CONV_IMPLS
REPLICA_AXES = ("auto", "vmap", "map")
NORM_DEFINITIONS = ("paper", "bartlett", "paper_input", "deep_norm")  # = jaxnorm.norms.DEFINITIONS
NORM_LAYERS = ("fold", "exclude", "include")  # = jaxnorm.norms.NORM_LAYERS
NORM_ATTENTIONS = ("stacked", "separate")  # = jaxnorm.norms.ATTENTIONS
NORM_CONV_BOUNDS = ("auto", "exact", "circulant")  # "auto" + jaxnorm.norms.CONV_BOUNDS

# Appendix E, "Trainings and values of P".
MNIST_P = (89, 188, 375, 750, 1500, 3000, 6000, 12000, 24000, 30000, 36000, 42000, 48000)
CIFAR_CNN_P = tuple(range(4000, 48001, 4000))
CIFAR_DEEP_P = tuple(range(6000, 46001, 5000))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One sweep. All fields are plain data (saved as ``config.json`` in the run directory).

    Science (a resumed run must match these):
      arch, dataset: the pair; ``size`` "paper" or "small" (CPU-sized models of jaxnorm.models).
      P: training-set sizes; ``seeds``: replicas per P; ``sweep_seed``: root of all randomness
        (replica (P, s) derives its subset, init and data order from (sweep_seed, P, s)).
      epochs, batch_size, optimizer ("adam" | "adamw"), lr, weight_decay (AdamW only; the
        paper uses 0), adam_b1, adam_b2, adam_eps (PyTorch/optax defaults).
      eval_schedule: when a replica is evaluated (:meth:`eval_steps`); the last step always is,
        ``eval_at_init`` adds step 0 (the initialization):
        "every": every ``eval_every`` epochs (the same epochs for every P);
        "log": ``eval_points`` log-spaced epochs in [1, epochs] (:func:`eval_epochs`);
        "log_steps": ``eval_points`` log-spaced optimizer steps in [1, epochs * ceil(P / batch_size)]
          for each P (:func:`log_spaced_steps`), rounded and deduplicated: the early phase of every P is
          sampled, not only epoch boundaries (for large P one epoch is already deep into training; the
          paper logs 50 log-spaced points per curve). Small P get fewer distinct steps; evaluations off
          an epoch boundary have a fractional ``epoch`` column (step / steps per epoch).
      test_subset: 0 = the full test split; n > 0 = a fixed subset of n test examples
        (the first n of a permutation of the test split drawn with numpy seed 0).
      train_eval_max: 0 = train error/loss on the replica's whole subset; n > 0 = on its first
        n examples (cheaper for large P).
      margin_epochs: epochs at which the raw test margins are saved (margins/P{P}_s{s}_e{e}.npy).
      norm_definition, norm_layers, norm_attention, dense_method, norm_conv_bound, norm_max_iters, norm_tol:
        passed to ``jaxnorm.norms.evaluate`` (definition, norm_layers, attention, dense_method, conv_bound,
        max_iters, tol);
        ``norm_definition="deep_norm"`` is the paper authors' reference formula; ``norm_layers="fold"`` folds
        BatchNorm/LayerNorm scales into their convs/dense layers (see jaxnorm.norms);
        ``norm_conv_bound="auto"`` is resolved per backend and architecture by
        ``jaxnorm.engine.default_conv_bound`` (the resolved value is in ``summary.json``).
      norm_zoo: also log the cheap norms of ``jaxnorm.norms.norm_zoo`` (``zoo/<name>`` columns).
      seed_start: the seeds of this run are seed_start .. seed_start + seeds - 1 (to split one
        sweep over hosts or runs; results of the parts concatenate).
      lr_overrides: list of {P, seed, lr} tables, the learning rate of single replicas (for
        ablations and the divergence test); empty for the paper.
    Engine knobs (may change between a run and its resume; they change speed and the last
      bits of float results only):
      conv_impl: "auto" | "xla" | "patches" | "im2col" | "phase" (cnn only) (see jaxnorm.models).
      replica_axis: "auto" | "vmap" | "map": how one dispatch runs its replicas: one batched
        (vmapped) program, or the unbatched per-replica step in a loop inside the dispatch
        (lax.map); "auto" = "map" on CPU, "vmap" on accelerators (see bench/bench_engine.py).
      replicas_per_device: replica slots per device; 0 = automatic.
      steps_per_dispatch: train steps per device call (a lax.scan); 0 = automatic per backend.
      scan_unroll: unroll factor of that scan; 0 = automatic (1: rolled, fastest on CPU and accelerators).
      eval_batch: examples per evaluation call; 0 = the backend's default
        (``jaxnorm.engine.default_eval_batch``: 250 on the CPU, 1000 on accelerators).
      checkpoint_minutes, checkpoint_epochs: checkpoint when either interval has elapsed
        (epochs counted by the longest-running replica); 0 disables that trigger.
      data_dir: where jaxnorm.data finds the datasets ("" = its default).
    """

    arch: str = "cnn"
    dataset: str = "mnist"
    size: str = "paper"
    P: tuple[int, ...] = MNIST_P
    seeds: int = 5
    sweep_seed: int = 0
    epochs: int = 500
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    eval_schedule: str = "every"
    eval_every: int = 1
    eval_points: int = 60
    eval_at_init: bool = True
    test_subset: int = 0
    train_eval_max: int = 0
    margin_epochs: tuple[int, ...] = ()
    norm_definition: str = "paper"
    norm_layers: str = "fold"
    norm_attention: str = "stacked"
    norm_zoo: bool = True
    # "power" (power iteration, Gram-iteration upper bound, certified within norm_tol). It was chosen when a
    # batched eigvalsh in the per-device norm programs deadlocked XLA:CPU with 2 devices; the LAPACK calls
    # now run one matrix at a time on the CPU (norms._one_at_a_time_on_cpu), so "svd" is safe there too.
    dense_method: str = "power"
    norm_max_iters: int = 500
    # 1e-3: every logged spectral norm certified within 0.1% (R_A's interval within ~2% for ResNet-20's ~20
    # factors; R_A moves over ~7 decades during training). 1e-5 asks the float32 power iteration for more than it
    # reaches on LeNet's conv2 within max_iters: in a Fashion-MNIST sweep 23 of 80 readings stayed unconverged,
    # with conv gaps up to 7%; at 1e-3 none did.
    norm_tol: float = 1e-3
    # "auto": engine.default_conv_bound -- "exact" (certified to norm_tol by a block-Cholesky test) except the
    # ResNet on the CPU, "circulant" there (cheap and loose: gaps up to 48% on LeNet's conv2, 9.5% on ResNet-20;
    # one exact test of the paper-size ResNet-20 costs ~0.8 s per conv and replica on the 2-core CPU).
    norm_conv_bound: str = "auto"
    seed_start: int = 0
    lr_overrides: tuple[tuple[int, int, float], ...] = ()
    conv_impl: str = "auto"
    replica_axis: str = "auto"
    replicas_per_device: int = 0
    steps_per_dispatch: int = 0
    scan_unroll: int = 0
    eval_batch: int = 0
    checkpoint_minutes: float = 10.0
    checkpoint_epochs: int = 0
    data_dir: str = ""

    def eval_epochs(self) -> tuple[int, ...]:
        """The sorted epochs (0 = initialization) at which every replica is evaluated.

        The schedule's epochs plus ``margin_epochs`` (margins are computed by an evaluation).

        Raises:
          ValueError: ``eval_schedule="log_steps"``, whose evaluations are steps that depend on P
            (use :meth:`eval_steps`).
        """
        if self.eval_schedule == "log_steps":
            raise ValueError("eval_schedule='log_steps' evaluates at optimizer steps that depend on P; "
                             "use SweepConfig.eval_steps(steps_per_epoch)")
        ev = eval_epochs(self.epochs, self.eval_schedule, self.eval_every, self.eval_points,
                         self.eval_at_init)
        return tuple(sorted(set(ev) | set(self.margin_epochs)))

    def eval_steps(self, steps_per_epoch: int) -> tuple[int, ...]:
        """The sorted optimizer-step counts (0 = initialization) at which a replica is evaluated.

        A replica takes ``steps_per_epoch`` = ceil(P / batch_size) steps per epoch
        (:func:`jaxnorm.schedule.make_jobs`), ``epochs * steps_per_epoch`` in all. Epoch schedules
        ("every", "log") give ``epoch * steps_per_epoch`` for each of :meth:`eval_epochs`;
        "log_steps" gives :func:`log_spaced_steps` of the replica's total steps. Both add
        ``margin_epochs * steps_per_epoch`` (margins are saved at epoch boundaries).

        Args:
          steps_per_epoch: optimizer steps of one epoch of this replica (>= 1).

        Returns:
          Sorted distinct ints in [0, epochs * steps_per_epoch]; the last is always included.
        """
        if self.eval_schedule != "log_steps":
            return tuple(e * steps_per_epoch for e in self.eval_epochs())
        grid = log_spaced_steps(self.epochs * steps_per_epoch, self.eval_points, self.eval_at_init)
        return tuple(sorted(set(grid) | {e * steps_per_epoch for e in self.margin_epochs}))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["P"] = list(self.P)
        d["margin_epochs"] = list(self.margin_epochs)
        d["lr_overrides"] = [{"P": p, "seed": s, "lr": lr} for p, s, lr in self.lr_overrides]
        return d

    def science(self) -> dict[str, Any]:
        """The fields that must match for a run directory to be resumed."""
        d = self.to_dict()
        for k in ENGINE_KEYS:
            d.pop(k)
        return d


FIELDS = tuple(f.name for f in dataclasses.fields(SweepConfig))
ENGINE_KEYS = ("conv_impl", "replica_axis", "replicas_per_device", "steps_per_dispatch", "scan_unroll", "eval_batch",
               "checkpoint_minutes", "checkpoint_epochs", "data_dir")


def eval_epochs(epochs: int, schedule: str, every: int, points: int, at_init: bool) -> tuple[int, ...]:
    """Evaluation epochs: every ``every`` epochs, or ``points`` log-spaced in [1, epochs]."""
    if schedule == "every":
        ev = set(range(every, epochs + 1, every))
    else:
        ev = {int(round(x)) for x in _logspace(points, epochs)}
    ev.add(epochs)
    if at_init:
        ev.add(0)
    return tuple(sorted(e for e in ev if 0 <= e <= epochs))


def log_spaced_steps(total_steps: int, points: int, at_init: bool) -> tuple[int, ...]:
    """``points`` optimizer steps log-spaced in [1, total_steps], rounded to integers and deduplicated.

    The "log_steps" schedule of one replica: ``np.geomspace(1, total_steps, points)`` rounded
    (numpy's round half to even), distinct values only, so a short run (small P) simply has fewer
    points; ``total_steps`` is always included, step 0 (the initialization) when ``at_init``.

    Args:
      total_steps: the replica's optimizer steps, epochs * steps_per_epoch (>= 1).
      points: log-spaced points before deduplication (>= 2: the grid's two ends).
      at_init: also evaluate at step 0.

    Returns:
      Sorted distinct ints; e.g. (0, 1, 2, 3, 6, 10) for (10, 5, True).
    """
    # geomspace pins both ends exactly (1 and total_steps), so no rounding can lose the last step;
    # it is added anyway for points = 1.
    grid = {int(s) for s in np.round(np.geomspace(1, total_steps, points))} | {total_steps}
    if at_init:
        grid.add(0)
    return tuple(sorted(grid))


def _logspace(n: int, top: int) -> list[float]:
    if n <= 1:
        return [float(top)]
    return [math.exp(math.log(top) * i / (n - 1)) for i in range(n)]


def paper_defaults(arch: str, dataset: str) -> dict[str, Any]:
    """The settings of Appendix E for one (arch, dataset) pair, as a config dict.

    Paper: Adam (CNN, ResNet) / AdamW with weight decay 0 (ViT), lr 1e-3, 500 epochs for CNNs
    and 1000 for ResNets and ViTs; P grids of Appendix E (Fashion-MNIST takes MNIST's).
    Ours (not in the paper): batch 64 (CNN) / 128 (ResNet, ViT), 5 seeds, eval every epoch.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("dataset", dataset, DATASETS)
    if dataset in ("mnist", "fashion_mnist"):
        grid = MNIST_P
    elif arch == "cnn":
        grid = CIFAR_CNN_P
    else:
        grid = CIFAR_DEEP_P
    return dict(
        arch=arch, dataset=dataset, P=list(grid),
        epochs=500 if arch == "cnn" else 1000,
        batch_size=64 if arch == "cnn" else 128,
        optimizer="adamw" if arch == "vit" else "adam",
        lr=1e-3, weight_decay=0.0, seeds=5,
    )


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(map(str, allowed))}")


def from_dict(d: dict[str, Any]) -> SweepConfig:
    """Validates a config dict (TOML or JSON shaped) and returns a :class:`SweepConfig`.

    Raises:
      ValueError: naming the unknown key or the bad value and what is allowed.
    """
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed keys: {', '.join(FIELDS)}")
    d = dict(d)
    defaults = SweepConfig()
    types = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(SweepConfig)}
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key == "P":
            if isinstance(value, int):
                value = [value]
            if not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in value):
                raise ValueError(f"P={value!r}; allowed: a non-empty list of positive integers")
            if len(set(value)) != len(value):
                raise ValueError(f"P={value!r} has repeated values")
            out[key] = tuple(int(p) for p in value)
        elif key == "margin_epochs":
            if not isinstance(value, (list, tuple)) or not all(isinstance(e, int) and e >= 0 for e in value):
                raise ValueError(f"margin_epochs={value!r}; allowed: a list of integers >= 0")
            out[key] = tuple(sorted(set(int(e) for e in value)))
        elif key == "lr_overrides":
            out[key] = _lr_overrides(value)
        elif types[key] is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}; allowed: a number")
            out[key] = float(value)
        elif types[key] is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}; allowed: true or false")
            out[key] = value
        elif types[key] is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key}={value!r}; allowed: an integer")
            out[key] = value
        else:
            if not isinstance(value, str):
                raise ValueError(f"{key}={value!r}; allowed: a string")
            out[key] = value
    cfg = dataclasses.replace(defaults, **out)
    validate(cfg)
    return cfg


def _lr_overrides(value: Any) -> tuple[tuple[int, int, float], ...]:
    allowed = "a list of tables {P = int, seed = int, lr = positive number}, e.g. [{P = 500, seed = 0, lr = 0.01}]"
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"lr_overrides={value!r}; allowed: {allowed}")
    rows = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"P", "seed", "lr"}:
            raise ValueError(f"lr_overrides entry {item!r}; allowed: a table with keys P, seed, lr")
        for k, kinds in (("P", (int,)), ("seed", (int,)), ("lr", (int, float))):
            if isinstance(item[k], bool) or not isinstance(item[k], kinds):
                raise ValueError(f"lr_overrides entry {item!r}: {k}={item[k]!r}; allowed: "
                                 f"{'an integer' if k != 'lr' else 'a positive number'}")
        if not (item["lr"] > 0 and math.isfinite(item["lr"])):
            raise ValueError(f"lr_overrides entry {item!r}: lr={item['lr']!r}; allowed: a positive finite number")
        rows.append((item["P"], item["seed"], float(item["lr"])))
    return tuple(rows)


def validate(cfg: SweepConfig) -> None:
    """Checks the values of a config; raises ValueError naming the bad value and the allowed ones."""
    _check_choice("arch", cfg.arch, ARCHS)
    _check_choice("dataset", cfg.dataset, DATASETS)
    _check_choice("size", cfg.size, SIZES)
    _check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _check_choice("eval_schedule", cfg.eval_schedule, EVAL_SCHEDULES)
    _check_choice("conv_impl", cfg.conv_impl, CONV_IMPLS)
    if cfg.conv_impl == "phase" and cfg.arch != "cnn":
        raise ValueError(f"conv_impl='phase' is for arch 'cnn' only, not {cfg.arch!r}; allowed for {cfg.arch!r}: "
                         f"{', '.join(c for c in CONV_IMPLS if c != 'phase')}")
    _check_choice("replica_axis", cfg.replica_axis, REPLICA_AXES)
    _check_choice("norm_definition", cfg.norm_definition, NORM_DEFINITIONS)
    _check_choice("norm_layers", cfg.norm_layers, NORM_LAYERS)
    _check_choice("norm_attention", cfg.norm_attention, NORM_ATTENTIONS)
    _check_choice("norm_conv_bound", cfg.norm_conv_bound, NORM_CONV_BOUNDS)
    _check_choice("dense_method", cfg.dense_method, ("svd", "power"))
    if not cfg.norm_tol > 0:
        raise ValueError(f"norm_tol={cfg.norm_tol!r}; allowed: > 0")
    positive = ("seeds", "epochs", "batch_size", "eval_every", "eval_points", "norm_max_iters")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)!r}; allowed: an integer >= 1")
    for key in ("scan_unroll", "eval_batch", "test_subset", "train_eval_max", "replicas_per_device", "steps_per_dispatch",
                "checkpoint_epochs", "sweep_seed", "seed_start"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}={getattr(cfg, key)!r}; allowed: an integer >= 0")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr={cfg.lr!r}; allowed: a positive finite number")
    if cfg.weight_decay < 0:
        raise ValueError(f"weight_decay={cfg.weight_decay!r}; allowed: >= 0")
    if cfg.weight_decay > 0 and cfg.optimizer != "adamw":
        raise ValueError(f"weight_decay={cfg.weight_decay} needs optimizer='adamw' (got {cfg.optimizer!r})")
    if cfg.eval_schedule == "log_steps" and cfg.eval_points < 2:
        raise ValueError(f"eval_points={cfg.eval_points!r} with eval_schedule='log_steps'; allowed: an integer >= 2 "
                         f"(the log-spaced grid runs from step 1 to the last step)")
    if cfg.checkpoint_minutes < 0:
        raise ValueError(f"checkpoint_minutes={cfg.checkpoint_minutes!r}; allowed: >= 0")
    bad = [e for e in cfg.margin_epochs if e > cfg.epochs]
    if bad:
        raise ValueError(f"margin_epochs {bad} exceed epochs={cfg.epochs}; allowed: 0..{cfg.epochs}")
    for p, s, lr in cfg.lr_overrides:
        if p not in cfg.P or not cfg.seed_start <= s < cfg.seed_start + cfg.seeds:
            raise ValueError(f"lr_overrides entry P={p}, seed={s} is not a replica of this sweep "
                             f"(P in {list(cfg.P)}, seed in {cfg.seed_start}..{cfg.seed_start + cfg.seeds - 1})")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Reads a sweep TOML file into a dict (not yet validated)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} is not a file; allowed: a TOML file such as sweeps/demo.toml")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        except UnicodeDecodeError as err:  # tomllib decodes the whole file first
            raise ValueError(f"config file {str(path)!r} is not a text (UTF-8 TOML) file: byte "
                             f"{err.object[err.start:err.start + 1]!r} at offset {err.start}") from None


def resolve(arch: str | None = None, dataset: str | None = None, file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Paper defaults for (arch, dataset), updated by a TOML file, then by ``overrides``.

    ``arch``/``dataset`` may come from the file instead of the arguments.
    """
    from_file = load_toml(file) if file else {}
    unknown = sorted(set(from_file) - set(FIELDS))
    if unknown:
        raise ValueError(f"{file}: unknown config key(s) {unknown}; allowed keys: {', '.join(FIELDS)}")
    arch = arch or from_file.get("arch")
    dataset = dataset or from_file.get("dataset")
    if arch is None or dataset is None:
        raise ValueError("give --arch and --dataset (or a --config file that sets arch and dataset)")
    if "arch" in from_file and from_file["arch"] != arch:
        raise ValueError(f"--arch {arch} contradicts arch={from_file['arch']!r} in {file}")
    if "dataset" in from_file and from_file["dataset"] != dataset:
        raise ValueError(f"--dataset {dataset} contradicts dataset={from_file['dataset']!r} in {file}")
    d = paper_defaults(arch, dataset)
    d.update(from_file)
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(d)


def to_json(cfg: SweepConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> SweepConfig:
    return from_dict(json.loads(text))
