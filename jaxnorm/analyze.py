"""Command line: the scaling-law analysis of a sweep run directory.

    python -m jaxnorm.analyze RUN_DIR [--out DIR] [--p-min P] [--gamma1-window LO HI]
                              [--optimum {vertex,argmin}] [--n-boot N] [--no-figures]

Automatic mode by default (analysis module docstring); ``--p-min P --gamma1-window LO HI
--optimum argmin`` is the paper authors' procedure (LO/HI bound lambda/lambda_opt; "none" = open).

Writes into DIR (default RUN_DIR/analysis): table1.{md,csv} (Model, Dataset, gamma_pred,
gamma_meas, sigma), table2.{md,csv} (Model, Dataset, gamma1, sigma1, gamma2, sigma2),
summary.json (everything: fits with ranges, P_min, collapse quality, thresholds, warnings) and,
per (arch, dataset), the figures (PNG and PDF) of Figs. 3-9 of the paper, and a held-out check
(fit all but the two largest P, predict their optima: summary "holdout"), the early-phase collapse
quality of every logged norm (``norm_collapse_<group>.{md,csv}``, summary "norm_collapse") and the
sweep's own summary.json (wall time, seconds per activity, engine throughput: summary "run"). Bad input: one
``error:`` line naming the problem, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from jaxnorm import analysis, cli, rundir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxnorm.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="sweep run directory (holds results.csv)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/analysis)")
    p.add_argument("--p-min", type=int, default=None,
                   help="smallest P in the fits (default: chosen from the collapse, Appendix D)")
    p.add_argument("--collapse-tol", type=float, default=0.08,
                   help="rms log10 deviation allowed for the automatic P_min (default 0.08)")
    p.add_argument("--gamma1-window", nargs=2, default=None, metavar=("LO", "HI"),
                   help="authors' gamma1: fit window on lambda/lambda_opt ('none' = open)")
    p.add_argument("--optimum", choices=("vertex", "argmin"), default="vertex",
                   help="lambda_opt: parabola vertex (default) or grid arg-min (the authors')")
    p.add_argument("--n-boot", type=int, default=0, help="bootstrap resamples over seeds (0: off)")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true", help="tables and summary only")
    return p


def _group(df, s):
    """The rows of one analysed (arch, dataset, size) group."""
    for col, val in (("arch", s.get("arch")), ("dataset", s.get("dataset")), ("size", s.get("size"))):
        if col in df.columns and val is not None:
            df = df[df[col].astype(str) == val]
    return df


def _engine_summaries(run_dir: str) -> dict:
    """The sweep's own ``summary.json`` (``summary.p<i>.json`` per process): wall time summed over the run's
    segments, the seconds in training / norms / metrics / checkpoints, the engine throughput
    (``train_images_per_s``), devices and engine settings. {} when the run directory has none (e.g. a
    results table analysed on its own)."""
    import glob
    import json

    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "summary*.json"))):
        try:
            with open(path) as fh:
                found[os.path.basename(path)] = json.load(fh)
        except (OSError, ValueError):
            continue  # not the engine's file (or unreadable): the analysis does not need it
    return found


def main(argv=None) -> int:
    """The CLI; exit code 0, 2 (a user mistake, or no group could be analysed: one ``error:`` line,
    nothing written), 130 (Ctrl-C)."""
    return cli.guard(_main, argv, interrupted="interrupted; rerun the same command")


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.p_min is not None and args.p_min <= 0:
        print(f"error: --p-min must be a positive integer, got {args.p_min}", file=sys.stderr)
        return 2
    if args.n_boot < 0:
        print(f"error: --n-boot must be >= 0, got {args.n_boot}", file=sys.stderr)
        return 2
    window = None
    if args.gamma1_window is not None:
        try:
            window = tuple(None if w.lower() == "none" else float(w) for w in args.gamma1_window)
        except ValueError:
            print(f"error: --gamma1-window takes two numbers or 'none', got {args.gamma1_window}",
                  file=sys.stderr)
            return 2
    df = analysis.load_run(args.run_dir)  # a table that does not parse: ValueError naming file and line
    out = args.out or os.path.join(args.run_dir, "analysis")
    rundir.make_dir(out, "--out" if args.out else "analysis directory (choose another with --out)")
    kw = dict(p_min=args.p_min, gamma1_window=window, optimum=args.optimum,
              collapse_tol=args.collapse_tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", analysis.AnalysisWarning)
        try:
            summaries = analysis.analyze_all(df, n_boot=args.n_boot, boot_seed=args.boot_seed, **kw)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        errs = [s["error"] for s in summaries.values() if "error" in s]
        if errs and len(errs) == len(summaries):
            print(f"error: {errs[0]}", file=sys.stderr)
            return 2
        for name, s in summaries.items():
            if "error" not in s:
                s["holdout"] = analysis.holdout(_group(df, s), n_out=2, **kw)
    os.makedirs(out, exist_ok=True)
    t1, t2 = analysis.tables(summaries)
    t1.to_csv(os.path.join(out, "table1.csv"), index=False)
    t2.to_csv(os.path.join(out, "table2.csv"), index=False)
    with open(os.path.join(out, "table1.md"), "w") as fh:
        fh.write("Table 1: predicted vs measured eps(P) exponents (eps ~ P^-gamma)\n\n")
        fh.write(analysis.to_markdown(t1))
    with open(os.path.join(out, "table2.md"), "w") as fh:
        fh.write("Table 2: exponents gamma1 (Eq. 3) and gamma2 (Eq. 4)\n\n")
        fh.write(analysis.to_markdown(t2))
    # Which norm collapses the early phase best (issue 8's zoo), per group with norm columns.
    for name, s in summaries.items():
        if "error" in s:
            continue
        sub = _group(df, s)
        if any(str(c).startswith("zoo/") for c in sub.columns):
            nc = analysis.compare_norms(sub)
            s["norm_collapse"] = nc.to_dict(orient="records")
            stem = os.path.join(out, f"norm_collapse_{name.replace('/', '_')}")
            nc.to_csv(stem + ".csv", index=False)
            with open(stem + ".md", "w") as fh:
                fh.write(f"Early-phase collapse of eps(x) across P for each norm x ({name}; "
                         "jaxnorm.analysis.compare_norms: spread = std of log10 eps across P, smaller is better)\n\n")
                fh.write(analysis.to_markdown(nc))
    figures = {}
    if not args.no_figures:
        from jaxnorm import plots  # matplotlib only when figures are wanted

        for name, s in summaries.items():
            if "error" in s:
                continue
            sub = _group(df, s)
            fig_dir = os.path.join(out, "figures", name.replace("/", "_"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figures[name] = plots.all_figures(sub, s, fig_dir, run_dir=args.run_dir)
    analysis.dump_json({"run_dir": os.path.abspath(args.run_dir), "run": _engine_summaries(args.run_dir),
                        "groups": summaries, "figures": figures}, os.path.join(out, "summary.json"))
    print(analysis.to_markdown(t1[["Model", "Dataset", "gamma_pred", "gamma_meas", "sigma"]]))
    print(analysis.to_markdown(t2[["Model", "Dataset", "gamma1", "sigma1", "gamma2", "sigma2"]]))
    for name, s in summaries.items():
        if "error" in s:
            print(f"{name}: analysis failed: {s['error']}", file=sys.stderr)
        for w in s.get("warnings", []):
            print(f"{name}: warning: {w}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
