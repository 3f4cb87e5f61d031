"""CLI: train a (P, seed) sweep of the paper's Sec. 3 and log test error vs spectral complexity.

    python -m jaxnorm.sweep --arch {cnn,resnet,vit,perceptron} --dataset {mnist,fashion_mnist,cifar10,cifar100}
        [--config FILE] [--p 500,1000] [--seeds N] [--epochs N] [--replicas-per-device N] [--out DIR]
        [--resume | --overwrite] [--quiet] [--data-dir DIR] [--eval-every N | --eval-points N]
        [--eval-schedule every|log|log_steps]
        [--size paper|small] [--batch-size N] [--steps-per-dispatch N] [--scan-unroll N]
        [--conv-impl auto|xla|canonical|patches|im2col|phase] [--test-subset N] [--margin-epochs 1,10,100]
        [--checkpoint-minutes M] [--checkpoint-epochs N] [--no-plot] [--cache-dir DIR|none]
        [--cpu-devices N] [--distributed [--coordinator-address HOST:PORT --num-processes N --process-id I]]

Without ``--config`` the settings are the paper's for that (arch, dataset) pair (Appendix E;
``jaxnorm.config.paper_defaults``, mirrored by ``sweeps/<arch>_<dataset>.toml``); a config file
overrides them and command-line flags override both. ``--config sweeps/demo.toml`` is the CPU
demo (a small CNN on Fashion-MNIST, several P, 2 seeds).

Run directory (``--out``, default ``runs/<arch>_<dataset>``): see ``jaxnorm.results``; at the end
``curves.png`` (test error vs spectral complexity per P) is written there.

Resume: rerunning the same command resumes from the last checkpoint (a finished run is a no-op);
``--resume`` insists that there is a run to resume; a run directory holding a different sweep is an
error (pass another ``--out`` or ``--overwrite``). Engine knobs (replicas per device, steps per
dispatch, scan unroll, eval batch, checkpoint interval, data dir) may change between runs.

CPU devices: ``--cpu-devices N`` splits the host into N XLA CPU devices before JAX starts
(``--xla_force_host_platform_device_count``; not when ``XLA_FLAGS`` already sets it), so the engine
shards its replicas over them; at most one per job. The default, ``auto``, is one device per usable
core, at most :data:`AUTO_CPU_DEVICES_MAX`: on the 2-core reference machine 2 devices trained R = 16
replicas 1.32x (LeNet-5), 1.34x (ResNet-20) and 1.29x (ViT) as fast as one 2-thread device
(bench/bench_engine.py, bench/engine.json); more than 2 cores is not measured. ``--cpu-devices 1`` is
JAX's single CPU device. The flag does nothing to GPU/TPU runs. (Multi-device CPU runs used to abort
in an all-gather or hang in a batched LAPACK call: see ``jaxnorm.engine``, "Devices", and
``jaxnorm.norms._one_at_a_time_on_cpu``.)

Many hosts: ``--distributed`` calls ``jax.distributed.initialize()`` before anything else: on Slurm
and Cloud TPU it finds the coordinator, the process count and this process's id itself; elsewhere
pass ``--coordinator-address HOST:PORT --num-processes N --process-id I``. Every process runs the
same command; process i trains its share of the jobs (``jaxnorm.schedule.process_share``) on its
local devices into the same ``--out`` (a shared file system), and rerunning the command on every
process resumes. ``curves.png`` is written by whichever process finds all shards finished.

``--arch perceptron`` runs ``jaxnorm.perceptron_report`` (``--alpha``, ``--out``, ``--quick`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jaxnorm import cli
from jaxnorm import config as config_lib

ARCH_CHOICES = config_lib.ARCHS + ("perceptron",)
DEFAULT_CACHE = Path.home() / ".cache" / "jaxnorm" / "xla"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 500,1000") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxnorm.sweep", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCH_CHOICES, help="architecture (perceptron: the Sec. 2 report)")
    ap.add_argument("--dataset", choices=config_lib.DATASETS)
    ap.add_argument("--config", help="sweep TOML file (sweeps/*.toml); overrides the paper defaults")
    ap.add_argument("--p", type=_ints, help="training-set sizes, comma-separated (default: the paper's grid)")
    ap.add_argument("--seeds", type=int, help="seeds per P")
    ap.add_argument("--seed-start", type=int, help="first seed index (to split a sweep over runs/hosts)")
    ap.add_argument("--sweep-seed", type=int, help="root seed of the sweep")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--size", choices=config_lib.SIZES, help="model size: paper or small (CPU)")
    ap.add_argument("--eval-schedule", choices=config_lib.EVAL_SCHEDULES,
                    help="every: every --eval-every epochs; log: --eval-points log-spaced epochs; log_steps: "
                         "--eval-points log-spaced optimizer steps per P, from step 1 (see jaxnorm.config)")
    ap.add_argument("--eval-every", type=int, help="evaluate every N epochs (implies --eval-schedule every)")
    ap.add_argument("--eval-points", type=int,
                    help="N log-spaced evaluations: keeps a log or log_steps schedule of the config, "
                         "else selects log (epochs)")
    ap.add_argument("--test-subset", type=int, help="evaluate on a fixed subset of N test examples (0 = all)")
    ap.add_argument("--train-eval-max", type=int, help="train error on at most N examples (0 = whole subset)")
    ap.add_argument("--margin-epochs", type=_ints, help="epochs at which test margins are saved")
    ap.add_argument("--replicas-per-device", type=int, help="replica slots per device (0 = auto)")
    ap.add_argument("--steps-per-dispatch", type=int, help="train steps per device call (0 = auto)")
    ap.add_argument("--scan-unroll", type=int)
    ap.add_argument("--eval-batch", type=int, help="examples per evaluation call (0 = the backend default: 250 on CPU, 1000 on accelerators)")
    ap.add_argument("--conv-impl", choices=config_lib.CONV_IMPLS)
    ap.add_argument("--checkpoint-minutes", type=float)
    ap.add_argument("--checkpoint-epochs", type=int)
    ap.add_argument("--data-dir", help="dataset folder (see jaxnorm.data)")
    ap.add_argument("--out", help="run directory (default runs/<arch>_<dataset>)")
    ap.add_argument("--resume", action="store_true", help="require an existing run to resume")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    ap.add_argument("--cpu-devices", default="auto",
                    help="split the host into N XLA CPU devices, at most one per job (default 'auto': one per "
                         f"usable core, at most {AUTO_CPU_DEVICES_MAX}; 1: JAX's single CPU device)")
    ap.add_argument("--distributed", action="store_true",
                    help="multi-process run over jax.distributed (one process per host; see above)")
    ap.add_argument("--coordinator-address", help="with --distributed: HOST:PORT of process 0")
    ap.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    ap.add_argument("--process-id", type=int, help="with --distributed: this process's id, 0 .. N-1")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                    help=f"persistent XLA compilation cache (default {DEFAULT_CACHE}; 'none' disables)")
    return ap


def _eval_overrides(args, schedule: str | None = None) -> dict:
    """The evaluation-schedule fields from --eval-schedule, --eval-every and --eval-points.

    ``schedule`` is the config file's ``eval_schedule`` (None: none set). --eval-points keeps a log
    schedule of the file ("log" or "log_steps") rather than silently turning "log_steps" into "log".

    Raises:
      ValueError: the flags contradict each other (named).
    """
    o: dict = {}
    if args.eval_every is not None and args.eval_points is not None:
        raise ValueError("--eval-every and --eval-points contradict each other; give one")
    if args.eval_schedule is not None:
        o["eval_schedule"] = args.eval_schedule
    if args.eval_every is not None:
        if o.get("eval_schedule", "every") != "every":
            raise ValueError(f"--eval-every {args.eval_every} goes with --eval-schedule every, not "
                             f"{args.eval_schedule}; use --eval-points for log schedules")
        o.update(eval_schedule="every", eval_every=args.eval_every)
    if args.eval_points is not None:
        if o.get("eval_schedule") == "every":
            raise ValueError(f"--eval-points {args.eval_points} goes with --eval-schedule log or log_steps, not every; "
                             "use --eval-every N for every N epochs")
        o.setdefault("eval_schedule", schedule if schedule in ("log", "log_steps") else "log")
        o["eval_points"] = args.eval_points
    return o


def _overrides(args, schedule: str | None = None) -> dict:
    o = dict(P=args.p, seeds=args.seeds, seed_start=args.seed_start, sweep_seed=args.sweep_seed,
             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, size=args.size,
             test_subset=args.test_subset, train_eval_max=args.train_eval_max, margin_epochs=args.margin_epochs,
             replicas_per_device=args.replicas_per_device, steps_per_dispatch=args.steps_per_dispatch,
             scan_unroll=args.scan_unroll, eval_batch=args.eval_batch, conv_impl=args.conv_impl,
             checkpoint_minutes=args.checkpoint_minutes, checkpoint_epochs=args.checkpoint_epochs,
             data_dir=args.data_dir)
    o.update(_eval_overrides(args, schedule))
    return {k: v for k, v in o.items() if v is not None}


def plot(df, path: Path) -> list[str]:
    """Test error vs spectral complexity per P (jaxnorm.plots.plot_curves, or a minimal fallback)."""
    try:
        from jaxnorm import plots
        return plots.plot_curves(df, str(path))
    except ImportError:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = df[~df["diverged"]].groupby(["P", "epoch"])[["spectral_complexity", "test_error"]].mean().reset_index()
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for P, g in d.groupby("P"):
            ax.plot(g["spectral_complexity"], g["test_error"], label=f"P={P}")
        ax.set(xscale="log", yscale="log", xlabel="spectral complexity", ylabel="test error")
        ax.legend(fontsize=7)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return [str(path)]


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
AUTO_CPU_DEVICES_MAX = 8  # measured up to 2 (the reference machine); a cap until larger hosts are measured


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_cpu_devices(value: str) -> int | str:
    """``--cpu-devices`` value: ``"auto"`` or an integer >= 1; ValueError naming the bad value otherwise."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(f"--cpu-devices {value}; allowed: an integer >= 1 or 'auto'")
    return n


def set_cpu_devices(n: int | str | None, jobs: int | None = None) -> int | None:
    """Splits the host into ``n`` XLA CPU devices, at most ``jobs`` (a device without a replica would
    only idle and pad the slot array); ``n = None`` leaves JAX's default (one CPU device); ``"auto"``:
    :func:`usable_cores`, at most :data:`AUTO_CPU_DEVICES_MAX`.

    Must run before JAX initialises its backends; returns the count set, or None when it was left
    alone (``n`` is None, ``XLA_FLAGS`` already sets it, or JAX's backends are already up, e.g. in a
    notebook).
    """
    if n is None:
        return None
    n = parse_cpu_devices(n)
    if n == "auto":
        n = min(usable_cores(), AUTO_CPU_DEVICES_MAX)
    if CPU_DEVICES_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    if "jax" in sys.modules:  # XLA_FLAGS is read when the backends start, not at import
        try:  # JAX has no public test for this; if the private one moves, assume they are up
            from jax._src import xla_bridge  # noqa: PLC0415

            if xla_bridge.backends_are_initialized():
                return None
        except (ImportError, AttributeError):
            return None
    n = max(1, min(n, jobs or n))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_DEVICES_FLAG}={n}".strip()
    return n


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> str | None:
    """``jax.distributed.initialize`` (auto-detection when all three are None); returns an error line or None."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        return ("--coordinator-address HOST:PORT, --num-processes N and --process-id I go together "
                "(or none of them: auto-detection on Slurm and Cloud TPU)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        return f"--process-id {process_id}; allowed: 0 .. {num_processes - 1} (--num-processes {num_processes})"
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as err:
        return f"jax.distributed.initialize failed: {err}"
    return None


def all_shards_finished(out: Path) -> bool:
    """Whether every process of the run in ``out`` wrote its summary (one process: ``summary.json``)."""
    import jax

    n = jax.process_count()
    names = ["summary.json"] if n == 1 else [f"summary.p{i}.json" for i in range(n)]
    return all((out / name).exists() for name in names)


def main(argv=None) -> int:
    """The CLI; returns the exit code: 0, 2 (a user mistake: one ``error:`` line), 130 (Ctrl-C)."""
    return cli.guard(_main, argv)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--arch")
    known, rest = pre.parse_known_args(argv)
    if known.arch == "perceptron":
        from jaxnorm import perceptron_report

        perceptron_report.main(rest)
        return 0
    ap = parser()
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite contradict each other")
    try:
        schedule = config_lib.load_toml(args.config).get("eval_schedule") if args.config else None
        cfg = config_lib.resolve(args.arch, args.dataset, args.config, _overrides(args, schedule))
    except ValueError as err:
        ap.error(str(err))
    out = Path(args.out or f"runs/{cfg.arch}_{cfg.dataset}")
    explicit = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                    process_id=args.process_id)
    if not args.distributed and any(v is not None for v in explicit.values()):
        ap.error("--coordinator-address, --num-processes and --process-id go with --distributed")
    if args.distributed and args.overwrite:
        ap.error("--overwrite with --distributed: processes would delete each other's shards; "
                 "delete the run directory first")
    try:
        set_cpu_devices(args.cpu_devices, jobs=len(cfg.P) * cfg.seeds)
    except ValueError as err:
        ap.error(str(err))
    if args.cache_dir and args.cache_dir.lower() != "none":
        import jax

        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if args.distributed:
        err = init_distributed(**explicit)
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from jaxnorm import engine, results

    t0 = time.time()
    try:
        summary = engine.run(cfg, out, resume=True if args.resume else None, overwrite=args.overwrite,
                             quiet=args.quiet)
    except (engine.RunDirMismatch, ValueError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = []
    if not args.no_plot and all_shards_finished(out):
        df = results.load(out)
        if len(df) and not args.distributed:
            files = plot(df, out / "curves.png")
        elif len(df):  # processes may finish together: plot into a folder of one's own, then rename
            tmp = out / f".curves.{os.getpid()}"
            tmp.mkdir(exist_ok=True)
            plot(df, tmp / "curves.png")
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
                files.append(str(out / f.name))
            tmp.rmdir()
    summary = {**summary, "run_dir": str(out), "seconds": round(time.time() - t0, 1), "plots": files}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
