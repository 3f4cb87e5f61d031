"""Sweep configs: Appendix E defaults, the sweeps/*.toml files, validation errors, the CLI edge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnorm import config as C
from jaxnorm import sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def test_paper_defaults_are_appendix_e():
    # Appendix E: Adam (CNN, ResNet) / AdamW wd 0 (ViT), lr 1e-3, 500 epochs CNN, 1000 ResNet/ViT.
    assert C.MNIST_P == (89, 188, 375, 750, 1500, 3000, 6000, 12000, 24000, 30000, 36000, 42000, 48000)
    assert C.CIFAR_CNN_P == tuple(range(4000, 48001, 4000)) and len(C.CIFAR_CNN_P) == 12
    assert C.CIFAR_DEEP_P == (6000, 11000, 16000, 21000, 26000, 31000, 36000, 41000, 46000)
    for arch in C.ARCHS:
        for ds in C.DATASETS:
            d = C.paper_defaults(arch, ds)
            assert d["lr"] == 1e-3 and d["weight_decay"] == 0.0
            assert d["optimizer"] == ("adamw" if arch == "vit" else "adam")
            assert d["epochs"] == (500 if arch == "cnn" else 1000)
            if ds in ("mnist", "fashion_mnist"):
                assert tuple(d["P"]) == C.MNIST_P
            else:
                assert tuple(d["P"]) == (C.CIFAR_CNN_P if arch == "cnn" else C.CIFAR_DEEP_P)


@pytest.mark.parametrize("arch", C.ARCHS)
@pytest.mark.parametrize("ds", C.DATASETS)
def test_sweep_files_validate_and_equal_the_paper_defaults(arch, ds):
    path = SWEEPS / f"{arch}_{ds}.toml"
    cfg = C.resolve(file=path)
    expect = C.from_dict(C.paper_defaults(arch, ds))
    for key in ("arch", "dataset", "P", "epochs", "optimizer", "lr", "weight_decay", "batch_size", "seeds"):
        assert getattr(cfg, key) == getattr(expect, key), key
    assert C.resolve(arch, ds).P == expect.P  # no file: the same defaults


@pytest.mark.parametrize("name", ["demo", "smoke_cnn", "smoke_resnet", "smoke_vit"])
def test_small_sweep_files_validate(name):
    cfg = C.resolve(file=SWEEPS / f"{name}.toml")
    assert cfg.dataset == "fashion_mnist"


def test_unknown_key_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\]; allowed keys: arch, dataset"):
        C.from_dict({"epoch": 3})


@pytest.mark.parametrize("bad, match", [
    ({"optimizer": "sgd"}, r"optimizer='sgd'; allowed: adam, adamw"),
    ({"arch": "mlp"}, r"arch='mlp'; allowed: cnn, resnet, vit"),
    ({"P": [0, 10]}, r"P=\[0, 10\]; allowed: a non-empty list of positive integers"),
    ({"P": [10, 10]}, r"repeated"),
    ({"epochs": 0}, r"epochs=0; allowed: an integer >= 1"),
    ({"lr": "fast"}, r"lr='fast'; allowed: a number"),
    ({"eval_schedule": "sometimes"}, r"eval_schedule='sometimes'; allowed: every, log, log_steps$"),
    ({"eval_schedule": "log-steps"}, r"eval_schedule='log-steps'; allowed: every, log, log_steps$"),
    ({"eval_schedule": "log_steps", "eval_points": 0}, r"eval_points=0; allowed: an integer >= 1$"),
    ({"eval_schedule": "log_steps", "eval_points": 1}, r"eval_points=1 with eval_schedule='log_steps'; allowed: an "
                                                       r"integer >= 2"),
    ({"eval_schedule": "log_steps", "eval_points": 12.5}, r"eval_points=12.5; allowed: an integer$"),
    ({"weight_decay": 0.1}, r"needs optimizer='adamw'"),
    ({"margin_epochs": [600]}, r"margin_epochs \[600\] exceed epochs=500"),
    ({"lr_overrides": [{"P": 7, "seed": 0, "lr": 1.0}]}, r"not a replica of this sweep"),
    ({"conv_impl": "fft"}, r"allowed: auto, xla, canonical, patches, im2col"),
    ({"eval_batch": -1}, r"eval_batch=-1; allowed: an integer >= 0"),
    ({"norm_conv_bound": "tight"}, r"norm_conv_bound='tight'; allowed: auto, exact, circulant"),
])
def test_bad_values_name_the_allowed_ones(bad, match):
    with pytest.raises(ValueError, match=match):
        C.from_dict({**C.paper_defaults("cnn", "mnist"), **bad})


def test_eval_epochs_every_and_log():
    assert C.eval_epochs(5, "every", 2, 0, True) == (0, 2, 4, 5)
    ev = C.eval_epochs(1000, "log", 1, 4, False)
    assert ev == (1, 10, 100, 1000)  # 4 log-spaced points in [1, 1000]


def _geomspace_grid(total: int, points: int) -> list[int]:
    """The reference "log_steps" grid: np.geomspace rounded, deduplicated (the issue's definition)."""
    return [int(x) for x in np.unique(np.round(np.geomspace(1, total, points)))]


@pytest.mark.parametrize("P, batch, epochs, points", [
    (4000, 64, 150, 50),   # Fashion-MNIST CNN: 63 steps per epoch, 9450 steps
    (48000, 64, 500, 50),  # the paper's largest MNIST P: 750 steps per epoch
    (89, 64, 500, 50),     # the smallest: 2 steps per epoch
    (512, 64, 3, 12),
])
def test_log_steps_grid_is_rounded_geomspace_from_step_one_to_the_last(P, batch, epochs, points):
    spe = -(-P // batch)
    cfg = C.from_dict({**C.paper_defaults("cnn", "fashion_mnist"), "P": [P], "batch_size": batch, "epochs": epochs,
                       "eval_schedule": "log_steps", "eval_points": points})
    grid = cfg.eval_steps(spe)
    assert list(grid) == [0] + _geomspace_grid(epochs * spe, points)
    assert grid[1] == 1 and grid[-1] == epochs * spe and len(grid) <= points + 1
    no_init = C.from_dict({**cfg.to_dict(), "eval_at_init": False})
    assert list(no_init.eval_steps(spe)) == _geomspace_grid(epochs * spe, points)


def test_log_steps_by_hand_and_small_P_get_fewer_distinct_steps():
    # 10^(k/4) for k = 0..4: 1, 1.78, 3.16, 5.62, 10 -> 1, 2, 3, 6, 10.
    assert C.log_spaced_steps(10, 5, True) == (0, 1, 2, 3, 6, 10)
    # P = 128, batch 64, 3 epochs: 6 steps; 12 log-spaced points collapse to every step 1..6.
    assert C.log_spaced_steps(6, 12, False) == (1, 2, 3, 4, 5, 6)
    # One step in all: the initialization and the end.
    assert C.log_spaced_steps(1, 12, True) == (0, 1)
    # The early phase of a large P (4000 / 64 -> 63 steps per epoch, 150 epochs): 50 points put 18
    # evaluations inside the first epoch, where an epoch schedule has one (epoch 1); 4 rounded pairs merge.
    grid = C.log_spaced_steps(150 * 63, 50, True)
    assert [s for s in grid if 0 < s <= 63] == [1, 2, 3, 4, 5, 6, 8, 9, 11, 14, 16, 20, 24, 29, 35, 42, 51, 61]
    assert len(grid) == 1 + 45


def test_log_steps_adds_margin_epochs_at_epoch_boundaries_and_has_no_epoch_list():
    cfg = C.from_dict({**C.paper_defaults("cnn", "fashion_mnist"), "epochs": 150, "eval_schedule": "log_steps",
                       "eval_points": 5, "margin_epochs": [50]})
    spe = 63
    assert 50 * spe not in C.log_spaced_steps(150 * spe, 5, True)
    assert cfg.eval_steps(spe) == tuple(sorted(set(C.log_spaced_steps(150 * spe, 5, True)) | {50 * spe}))
    with pytest.raises(ValueError, match=r"depend on P; use SweepConfig.eval_steps"):
        cfg.eval_epochs()


def test_epoch_schedules_give_epoch_boundary_steps():
    cfg = C.from_dict({**C.paper_defaults("cnn", "fashion_mnist"), "epochs": 5, "eval_schedule": "every",
                       "eval_every": 2})
    assert cfg.eval_steps(7) == (0, 14, 28, 35)


def test_a_toml_file_selects_log_steps(tmp_path):
    text = (SWEEPS / "demo.toml").read_text().replace('eval_schedule = "log"', 'eval_schedule = "log_steps"')
    assert 'eval_schedule = "log_steps"' in text
    (tmp_path / "s.toml").write_text(text)
    cfg = C.resolve(file=tmp_path / "s.toml")
    assert cfg.eval_schedule == "log_steps" and cfg.eval_points == 16
    spe = -(-cfg.P[-1] // cfg.batch_size)
    assert set(_geomspace_grid(cfg.epochs * spe, 16)) <= set(cfg.eval_steps(spe))
    assert C.from_json(C.to_json(cfg)) == cfg


def test_config_json_round_trip():
    cfg = C.from_dict({**C.paper_defaults("vit", "cifar100"), "margin_epochs": [1, 5],
                       "lr_overrides": [{"P": 6000, "seed": 1, "lr": 0.5}]})
    assert C.from_json(C.to_json(cfg)) == cfg
    assert "replicas_per_device" not in cfg.science() and "P" in cfg.science()


def test_cli_rejects_bad_arguments_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "cnn", "--dataset", "mnist", "--epochs", "0"])
    assert "epochs=0; allowed: an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "cnn"])
    assert "--dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "cnn", "--dataset", "svhn"])
    assert "invalid choice: 'svhn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "cnn", "--dataset", "mnist", "--cpu-devices", "0"])
    assert "--cpu-devices 0; allowed: an integer >= 1 or 'auto'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "cnn", "--dataset", "mnist", "--cpu-devices", "many"])
    assert "--cpu-devices many; allowed: an integer >= 1 or 'auto'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "resnet", "--dataset", "mnist", "--conv-impl", "phase"])
    assert "conv_impl='phase' is for arch 'cnn' only" in capsys.readouterr().err


def test_cpu_devices_split_the_host_before_jax_starts():
    # In a fresh interpreter: N devices when asked (at most one per job), one per usable core for "auto"
    # (the CLI default), JAX's one device for None, and XLA_FLAGS wins.
    code = ("import sys; from jaxnorm import sweep; n = sweep.set_cpu_devices({arg}); import jax; "
            "print(n, jax.device_count(), sweep.set_cpu_devices(5))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    auto = min(sweep.usable_cores(), sweep.AUTO_CPU_DEVICES_MAX)
    for arg, want in (("None", "None 1 None"), ("3", "3 3 None"), ("3, jobs=2", "2 2 None"),
                      ("'auto'", f"{auto} {auto} None"), ("'auto', jobs=1", "1 1 None")):
        out = subprocess.run([sys.executable, "-c", code.format(arg=arg)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == want.split()  # once JAX is up, it is left alone
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run([sys.executable, "-c", code.format(arg="2")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["None", "4", "None"], out.stderr[-2000:]
    with pytest.raises(ValueError, match="--cpu-devices 0; allowed: an integer >= 1 or 'auto'"):
        sweep.set_cpu_devices(0)


def test_cli_overrides_reach_the_config():
    args = sweep.parser().parse_args(["--arch", "cnn", "--dataset", "mnist", "--p", "500,1000", "--seeds", "2",
                                      "--eval-points", "30", "--size", "small"])
    cfg = C.resolve(args.arch, args.dataset, args.config, sweep._overrides(args))
    assert cfg.P == (500, 1000) and cfg.seeds == 2 and cfg.eval_schedule == "log" and cfg.eval_points == 30
    assert cfg.size == "small" and cfg.epochs == 500


def _cli_cfg(argv, config=None):
    args = sweep.parser().parse_args(["--arch", "cnn", "--dataset", "fashion_mnist", *argv]
                                     + (["--config", str(config)] if config else []))
    schedule = C.load_toml(config).get("eval_schedule") if config else None
    return C.resolve(args.arch, args.dataset, args.config, sweep._overrides(args, schedule))


def test_cli_eval_schedule_flags(tmp_path):
    cfg = _cli_cfg(["--eval-schedule", "log_steps", "--eval-points", "12"])
    assert (cfg.eval_schedule, cfg.eval_points) == ("log_steps", 12)
    assert _cli_cfg(["--eval-schedule", "log_steps"]).eval_points == C.SweepConfig().eval_points
    assert (_cli_cfg(["--eval-every", "3"]).eval_schedule, _cli_cfg(["--eval-every", "3"]).eval_every) == ("every", 3)
    # --eval-points keeps the file's log_steps (it used to force "log": log-spaced epochs).
    text = (SWEEPS / "demo.toml").read_text().replace('eval_schedule = "log"', 'eval_schedule = "log_steps"')
    (tmp_path / "s.toml").write_text(text)
    cfg = _cli_cfg(["--eval-points", "40"], tmp_path / "s.toml")
    assert (cfg.eval_schedule, cfg.eval_points) == ("log_steps", 40)
    assert _cli_cfg(["--eval-points", "40"], SWEEPS / "cnn_fashion_mnist.toml").eval_schedule == "log"


@pytest.mark.parametrize("argv, message", [
    (["--eval-schedule", "log_step"], "argument --eval-schedule: invalid choice: 'log_step' (choose from"),
    (["--eval-schedule", "log_steps", "--eval-points", "1"],
     "eval_points=1 with eval_schedule='log_steps'; allowed: an integer >= 2"),
    (["--eval-schedule", "log_steps", "--eval-every", "2"], "--eval-every 2 goes with --eval-schedule every, not "
                                                            "log_steps"),
    (["--eval-schedule", "every", "--eval-points", "50"], "--eval-points 50 goes with --eval-schedule log or log_steps"),
    (["--eval-every", "2", "--eval-points", "50"], "--eval-every and --eval-points contradict each other"),
])
def test_cli_bad_eval_schedule_is_one_error_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--arch", "cnn", "--dataset", "fashion_mnist", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_perceptron_arch_routes_to_the_perceptron_report(monkeypatch):
    from jaxnorm import perceptron_report

    seen = []
    monkeypatch.setattr(perceptron_report, "main", lambda argv: seen.append(argv))
    assert sweep.main(["--arch", "perceptron", "--alpha", "5", "--out", "/tmp/x", "--quick"]) == 0
    assert seen == [["--alpha", "5", "--out", "/tmp/x", "--quick"]]


def test_margin_epochs_are_evaluation_epochs():
    # Margins are written by an evaluation: an epoch off the log grid must be added to it.
    cfg = C.resolve("cnn", "fashion_mnist", overrides=dict(epochs=150, eval_schedule="log", eval_points=5,
                                                         margin_epochs=[50]))
    assert 50 not in C.eval_epochs(150, "log", 1, 5, True)
    assert 50 in cfg.eval_epochs()
