"""One-shot accelerator check of jaxnorm: the figures that decide the accelerator defaults.

    bash bench/gpu_check.sh                  # on a lent GPU machine (see that file's header)
    make gpu-check                           # here: the same script, tiny sizes, on the CPU

Writes one JSON, ``$OUT/gpu_check.json`` (rewritten after every step, so a timeout keeps every
finished step), with, in order of priority (a step starts only while its time estimate fits in
what is left of ``--budget``; a skipped step is recorded as skipped):

  engine    the engine's train throughput with its accelerator defaults (vmap over replicas,
            16 steps per dispatch, "xla" convolutions) at R = 1, 16, 64, 256 replicas for
            LeNet-5, ResNet-20 and ViT (Fashion-MNIST, batch 64, the paper's optimizers),
            images/s summed over replicas and achieved TFLOP/s (XLA's cost analysis x 3);
  torch     a PyTorch per-model CUDA training loop of the same nets (``bench_engine.torch_model``),
            images/s, and the engine's ratio to it at each R;
  memory    XLA's memory analysis of the train dispatch (bytes per replica, fixed bytes) and the
            slot count the engine chooses for a sweep of the paper's MNIST grid;
  sweeps    a short real sweep per architecture through ``python -m jaxnorm.sweep`` (evaluation,
            norms, margins, checkpoints), SIGKILLed after its first checkpoint and rerun: the
            rerun must resume and leave exactly one row per evaluation;
  alternatives  at R = 64: lax.map instead of vmap, "patches" instead of XLA convs (CNN, ResNet),
            bfloat16 and TF32 instead of float32 matmul precision;
  estimate  the whole paper (9 pairs, the paper's P grids and epochs, 10 seeds) at the measured
            best rates (28x28 rates; CIFAR's 32x32x3 images make it a lower bound).

Targets (issue 14): at R = 64, >= 20x the PyTorch loop for LeNet-5 and >= 5x for ResNet-20 and
ViT; the whole paper under 24 hours.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine as be  # noqa: E402

from jaxnorm import config as config_lib  # noqa: E402
from jaxnorm import engine, models, schedule  # noqa: E402

ARCHS = ("cnn", "resnet", "vit")
# Appendix E's P grids (jaxnorm.config) and epochs of the nine (architecture, dataset) pairs.
MNIST_P, CIFAR_CNN_P, CIFAR_DEEP_P = config_lib.MNIST_P, config_lib.CIFAR_CNN_P, config_lib.CIFAR_DEEP_P
PAPER = {"cnn": [(MNIST_P, 500), (CIFAR_CNN_P, 500), (CIFAR_CNN_P, 500)],
         "resnet": [(MNIST_P, 1000), (CIFAR_DEEP_P, 1000), (CIFAR_DEEP_P, 1000)],
         "vit": [(MNIST_P, 1000), (CIFAR_DEEP_P, 1000), (CIFAR_DEEP_P, 1000)]}


class Check:
    """Runs the steps under one time budget and keeps the JSON on disk up to date."""

    def __init__(self, out: Path, budget: float):
        self.out, self.t0, self.budget = out, time.time(), budget
        self.result: dict = {"budget_s": budget, "skipped": []}
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def step(self, name: str, estimate_s: float, fn, *args, **kwargs):
        if self.left() < estimate_s:
            self.result["skipped"].append(f"{name} (needs ~{estimate_s:.0f} s, {self.left():.0f} s left)")
            self.save()
            return None
        t = time.time()
        try:
            value = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- one failed step must not lose the others
            value = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        print(f"[{time.time() - self.t0:6.1f} s] {name}: {json.dumps(value, default=str)[:300]} "
              f"({time.time() - t:.1f} s)", flush=True)
        self.save()
        return value


def environment() -> dict:
    info = dict(jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                    torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except ImportError:
        info["torch"] = None
    return info


def engine_rate(ds, arch: str, R: int, steps: int, size: str, precision: str | None = None,
                conv: str = "auto", axis: str = "auto") -> dict:
    backend = jax.default_backend()
    K = engine.default_steps_per_dispatch(backend, arch)
    conv = models.resolve_conv_impl(conv, backend, arch)
    axis = engine.default_replica_axis(backend) if axis == "auto" else axis
    t = time.time()
    if precision:
        with jax.default_matmul_precision(precision):
            rate = be.bench_engine(ds, arch, R, steps, K, 1, conv, axis, size=size)
    else:
        rate = be.bench_engine(ds, arch, R, steps, K, 1, conv, axis, size=size)
    flops = be.flop_per_image(arch, size)
    return dict(images_per_s=round(rate, 1), tflops=round(rate * flops / 1e12, 4), K=K, conv=conv, axis=axis,
                precision=precision or "default", seconds=round(time.time() - t, 1))


def memory(ds, arch: str, size: str) -> dict:
    cfg = be._config(arch, 1, size=size)
    eng = engine.Engine(cfg, "/tmp/_gpu_check_unused", dataset=ds)
    mem = eng.train_memory()
    jobs = schedule.make_jobs(MNIST_P, range(10), 1000, 64, [1000])
    out = dict(slots_paper_mnist_grid=engine.choose_slots(jobs, 0, jax.device_count(), jax.default_backend()))
    if mem:
        base, per = mem
        out.update(bytes_fixed=base, bytes_per_replica=per,
                   replicas_per_device_fitting_60pct=eng.estimate_replicas_per_device())
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    out["device_bytes_limit"] = stats.get("bytes_limit")
    return out


def sweep_kill_resume(arch: str, size: str, P: str, seeds: int, epochs: int, timeout: float) -> dict:
    """A real sweep, SIGKILLed once its first checkpoint exists, then the same command again."""
    out = Path(f"/tmp/_gpu_check_sweep_{arch}")
    subprocess.run(["rm", "-rf", str(out)], check=False)
    cmd = [sys.executable, "-m", "jaxnorm.sweep", "--arch", arch, "--dataset", "fashion_mnist", "--size", size,
           "--p", P, "--seeds", str(seeds), "--epochs", str(epochs), "--checkpoint-epochs", "1",
           "--margin-epochs", str(epochs), "--test-subset", "1000", "--out", str(out), "--quiet", "--no-plot"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = False
    while proc.poll() is None and time.time() - t0 < timeout / 2:
        if any((out / "checkpoints").glob("*/meta.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    if proc.poll() is None and not killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_wall = time.time() - t0
    t1 = time.time()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, timeout - first_wall))
    res = dict(killed_after_checkpoint=killed, first_s=round(first_wall, 1), rerun_rc=rerun.returncode,
               rerun_s=round(time.time() - t1, 1))
    if rerun.returncode != 0:
        res["rerun_tail"] = (rerun.stdout + rerun.stderr)[-800:]
        return res
    import pandas as pd

    df = pd.read_csv(out / "results.csv")
    summary = json.loads((out / "summary.json").read_text())
    res.update(rows=len(df), duplicate_rows=int(df.duplicated(["P", "seed", "step"]).sum()),
               jobs=summary["jobs"], finished=summary["finished"], slots=summary["slots"],
               norm_columns=int(sum(c.startswith("norm/") for c in df.columns)),
               images_per_s_rerun=round(summary["busy_replica_steps"] * 64 / max(summary["wall_time"], 1e-9), 1),
               ok=bool(killed and summary["finished"] == summary["jobs"]
                       and not df.duplicated(["P", "seed", "step"]).any()))
    return res


def paper_estimate(rates: dict) -> dict:
    out, total = {}, 0.0
    for arch, pairs in PAPER.items():
        rate = rates.get(arch)
        if not rate:
            out[arch] = "no rate"
            continue
        images = sum(sum(Ps) * epochs * 10 for Ps, epochs in pairs)
        hours = images / rate / 3600
        total += hours
        out[arch] = dict(training_images=images, images_per_s=rate, hours=round(hours, 2))
    out["total_hours"] = round(total, 2)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small models, R = 2, a few steps (the CPU test)")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of cnn,resnet,vit")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all steps (default 450)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check_out"))
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    if not archs or set(archs) - set(ARCHS):
        ap.error(f"--archs {args.archs!r}; allowed: a comma-separated subset of {','.join(ARCHS)}")
    size, Rs, alt_R, steps = ("small", [2], 2, 4) if args.tiny else ("paper", [1, 16, 64, 256], 64, 48)
    torch_R = 2 if args.tiny else 8  # a per-model loop: its images/s do not depend on R
    sweep = ("128,256", 2, 3) if args.tiny else ("1000,4000", 16, 3)
    backend = jax.default_backend()
    check = Check(Path(args.out), args.budget)
    r = check.result
    r["mode"] = "tiny" if args.tiny else "full"
    r["env"] = environment()
    check.save()
    ds = be._dataset(synthetic=False)
    r["engine"], r["torch"], r["memory"], r["sweeps"], r["alternatives"] = {}, {}, {}, {}, {}
    est = (lambda arch: 20 if args.tiny else {"cnn": 40, "resnet": 75, "vit": 60}[arch])
    # 1. the defaults at R = 64 and the PyTorch loop: the numbers the targets are about
    for arch in archs:
        r["engine"].setdefault(arch, {})[str(alt_R)] = check.step(f"engine {arch} R={alt_R}", est(arch), engine_rate,
                                                                  ds, arch, alt_R, steps, size)
        r["torch"][arch] = check.step(f"torch {arch}", est(arch) / 2, be.bench_torch, ds, arch, torch_R,
                                      steps, size, "cuda" if backend == "gpu" else "cpu")
        r["memory"][arch] = check.step(f"memory {arch}", est(arch) / 2, memory, ds, arch, size)
    # 2. real sweeps with a kill and a resume
    for arch in archs:
        r["sweeps"][arch] = check.step(f"sweep {arch}", 2 * est(arch), sweep_kill_resume, arch, size, *sweep,
                                       4 * est(arch))
    # 3. the other replica counts
    for R in Rs:
        for arch in archs:
            if str(R) not in r["engine"][arch]:
                r["engine"][arch][str(R)] = check.step(f"engine {arch} R={R}", est(arch), engine_rate, ds, arch, R,
                                                       steps, size)
    # 4. the engine's alternatives at R = alt_R
    other_axis = "vmap" if engine.default_replica_axis(backend) == "map" else "map"
    for arch in archs:
        alts = {f"replica_axis={other_axis}": dict(axis=other_axis), "bf16 matmuls": dict(precision="bfloat16")}
        if not args.tiny:
            alts.update({"tf32 matmuls": dict(precision="tensorfloat32"), "f32 matmuls": dict(precision="float32")})
        if arch != "vit" and models.resolve_conv_impl("auto", backend, arch) != "patches":
            alts["patches convs"] = dict(conv="patches")
        r["alternatives"][arch] = {name: check.step(f"alt {arch} {name}", est(arch), engine_rate, ds, arch, alt_R,
                                                    steps, size, **kw) for name, kw in alts.items()}
    # Ratios and the paper estimate from what was measured
    ratios, best = {}, {}
    for arch in archs:
        tr = r["torch"].get(arch)
        for R, v in r["engine"][arch].items():
            if isinstance(v, dict) and "images_per_s" in v:
                best[arch] = max(best.get(arch, 0.0), v["images_per_s"])
                if isinstance(tr, (int, float)) and tr:
                    ratios[f"{arch} R={R}"] = round(v["images_per_s"] / tr, 2)
        for v in (r["alternatives"].get(arch) or {}).values():
            if isinstance(v, dict) and "images_per_s" in v:
                best[arch] = max(best.get(arch, 0.0), v["images_per_s"])
    r["engine_over_torch"] = ratios
    r["paper_estimate"] = paper_estimate(best)
    check.save()
    print(json.dumps({"engine_over_torch": ratios, "paper_estimate": r["paper_estimate"],
                      "skipped": r["skipped"]}, indent=1))
    return r


if __name__ == "__main__":
    main()
