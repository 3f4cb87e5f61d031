"""Sweep configs: Appendix E defaults, the sweeps/*.toml files, validation errors, the CLI edge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    ({"eval_schedule": "sometimes"}, r"allowed: every, log"),
    ({"weight_decay": 0.1}, r"needs optimizer='adamw'"),
    ({"margin_epochs": [600]}, r"margin_epochs \[600\] exceed epochs=500"),
    ({"lr_overrides": [{"P": 7, "seed": 0, "lr": 1.0}]}, r"not a replica of this sweep"),
    ({"conv_impl": "fft"}, r"allowed: auto, xla, canonical, patches, im2col"),
])
def test_bad_values_name_the_allowed_ones(bad, match):
    with pytest.raises(ValueError, match=match):
        C.from_dict({**C.paper_defaults("cnn", "mnist"), **bad})


def test_eval_epochs_every_and_log():
    assert C.eval_epochs(5, "every", 2, 0, True) == (0, 2, 4, 5)
    ev = C.eval_epochs(1000, "log", 1, 4, False)
    assert ev == (1, 10, 100, 1000)  # 4 log-spaced points in [1, 1000]


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
    assert "--cpu-devices 0; allowed: an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--arch", "resnet", "--dataset", "mnist", "--conv-impl", "phase"])
    assert "conv_impl='phase' is for arch 'cnn' only" in capsys.readouterr().err


def test_cpu_devices_split_the_host_before_jax_starts():
    # In a fresh interpreter: N devices when asked (at most one per job), JAX's one device by
    # default, and XLA_FLAGS wins.
    code = ("import sys; from jaxnorm import sweep; n = sweep.set_cpu_devices({arg}); import jax; "
            "print(n, jax.device_count(), sweep.set_cpu_devices(5))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    for arg, want in (("None", "None 1 None"), ("3", "3 3 None"), ("3, jobs=2", "2 2 None")):
        out = subprocess.run([sys.executable, "-c", code.format(arg=arg)], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == want.split()  # once JAX is up, it is left alone
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run([sys.executable, "-c", code.format(arg="2")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["None", "4", "None"], out.stderr[-2000:]
    with pytest.raises(ValueError, match="--cpu-devices 0; allowed: an integer >= 1"):
        sweep.set_cpu_devices(0)


def test_cli_overrides_reach_the_config():
    args = sweep.parser().parse_args(["--arch", "cnn", "--dataset", "mnist", "--p", "500,1000", "--seeds", "2",
                                      "--eval-points", "30", "--size", "small"])
    cfg = C.resolve(args.arch, args.dataset, args.config, sweep._overrides(args))
    assert cfg.P == (500, 1000) and cfg.seeds == 2 and cfg.eval_schedule == "log" and cfg.eval_points == 30
    assert cfg.size == "small" and cfg.epochs == 500


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
