"""A/B benchmark of the engine's train path: this checkout against another commit, side by side in one run.

Each round runs ``bench_engine.py --engine-only R`` (the default variant of the architecture, all replica-steps
busy, no evaluation) once in a clean ``git worktree`` of REV and once here, alternating, so that load drifts
hit both alike; it prints each round's images/s and the median ratio (this checkout / REV), and writes them to
``bench/engine_ab.json``.

    python bench/bench_ab.py dcb78f3 --arch resnet --replicas 16 --rounds 3

Used to check that a change to the step (e.g. ``replica.make_train_step``'s ``lax.cond``) costs nothing when
every step is busy. Raises SystemExit(2) for a revision git does not know.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rate(tree: Path, arch: str, R: int, steps: int) -> float:
    """Images/s printed by the engine-only child of ``tree``'s bench_engine.py (its own jaxnorm first on the path)."""
    out = subprocess.run([sys.executable, str(tree / "bench" / "bench_engine.py"), "--arch", arch, "--synthetic",
                          "--engine-only", str(R), "--steps", str(steps)],
                         cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="the commit to compare against")
    ap.add_argument("--arch", default="resnet", choices=("cnn", "resnet", "vit"))
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24, help="timed steps per replica (a multiple of K)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/engine_ab.json", help="where the rounds and the ratio are written")
    args = ap.parse_args(argv)
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", args.rev + "^{commit}"], cwd=ROOT,
                      capture_output=True).returncode:
        print(f"bench_ab: unknown revision {args.rev!r}; give a commit of this repository", file=sys.stderr)
        raise SystemExit(2)
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = []
            for i in range(args.rounds):
                a = rate(other, args.arch, args.replicas, args.steps)
                b = rate(ROOT, args.arch, args.replicas, args.steps)
                rows.append((a, b))
                print(f"round {i + 1}: {args.rev} {a:.1f} img/s, this checkout {b:.1f} img/s, ratio {b / a:.3f}",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    ratio = statistics.median(b / a for a, b in rows)
    print(f"{args.arch} R={args.replicas}: this checkout / {args.rev} = {ratio:.3f} (median of {args.rounds})")
    out = dict(rev=args.rev, arch=args.arch, R=args.replicas, steps=args.steps, ratio=ratio,
               rounds=[dict(rev_images_per_s=a, this_images_per_s=b) for a, b in rows],
               measured=time.strftime("%Y-%m-%d %H:%M"), load_average=os.getloadavg())
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
