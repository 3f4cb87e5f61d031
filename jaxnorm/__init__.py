"""jaxnorm: scaling laws in learning curves against the spectral complexity norm.

A JAX/Flax reproduction and extension of D'Amico, Bocchi, Negri (2025), "Implicit bias
produces neural scaling laws in learning curves, from perceptrons to deep networks".

Modules (imports flow one way, top to bottom):
  layout     the linear operators of a model, as plain data
  data       MNIST / Fashion-MNIST / CIFAR-10/100 loading and per-replica subsets
  models     CNN (LeNet-5), ResNet and ViT in Flax, vmappable over replicas
  norms      spectral complexity (Bartlett et al. 2017; paper Eq. 2)
  schedule   jobs, the slot pool, LPT refill, compaction (no JAX)
  replica    one replica: typed state, pure train step, init, its key derivation
  evaluate   test/train error and loss, margins, spectral complexity of chosen slots
  checkpoint crash-safe checkpoints; results: the results writer and reader
  rundir     run directories: lock, whose directory, late overwrite, results checksum
  engine     the loop: (P, seed) sweeps sharded over devices and processes
  analysis   the fits of Eq. 3-6 and Appendix D; plots; CLIs sweep and analyze
  cli        the CLIs' edge: a user mistake is one `error:` line (exit 2), Ctrl-C exit 130
  theory     replica theory of the fixed-norm perceptron (Sec. 2, App. A)
  perceptron gradient descent on the teacher-student perceptron

Submodules are imported on first use so that ``import jaxnorm`` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "layout", "data", "models", "norms", "schedule", "replica", "evaluate", "checkpoint", "engine", "results",
    "config",
    "analysis", "plots", "theory", "perceptron", "perceptron_report", "rundir", "cli",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxnorm.{name}")
    raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")


__all__ = list(_SUBMODULES)
