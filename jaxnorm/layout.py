"""The linear layers of a model, as plain data.

A model (``jaxnorm.models``) describes every linear operator it applies with a
tuple of :class:`LinearLayer` records, in forward order. The spectral complexity
(``jaxnorm.norms``) reads nothing else about the model: this module is the
contract between the two, and it sits below both so that imports flow one way
(data -> models -> norms -> engine -> analysis -> CLI).

A record names where the operator's weights live in the model's variables
(``path``), what the operator acts on (``input_shape``, one example, no batch
axis) and how (``kind``, ``strides``, ``padding``). Biases are never listed: the
bound of Bartlett et al. (2017) concerns the linear parts only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KINDS = ("dense", "conv", "diag")
REFERENCES = ("zero", "identity")


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """One linear operator A_i of the paper's Eq. 2.

    Attributes:
      name: human-readable, unique within a model, e.g. ``"conv1"``,
        ``"stage2/block0/conv2"``, ``"encoder1/attn/query"``. Used as the
        per-layer column name in results (``norm/<name>/...``).
      kind: ``"dense"``: ``x -> x @ K`` with ``K`` the kernel reshaped to
        ``(prod(K.shape[:kernel_in_ndim]), -1)``; applied to every token
        independently when ``input_shape`` has a token axis.
        ``"conv"``: a 2-D convolution, kernel in Flax layout ``(kh, kw, C_in,
        C_out)``, acting on inputs of shape ``input_shape = (H, W, C_in)`` with
        ``strides`` and ``padding`` (zero padding, as ``flax.linen.Conv``).
        ``"diag"``: a per-channel scale (LayerNorm/BatchNorm ``scale``), as a
        diagonal operator; ``path`` points to the scale, ``var_path`` (BatchNorm
        only) to the running variance, and ``eps`` is the normalizer's epsilon.
      path: keys from the root of the model's variables dict to the kernel, e.g.
        ``("params", "Conv_0", "kernel")``.
      input_shape: shape of one example's input to the operator, no batch axis:
        ``(H, W, C_in)`` for conv; ``(d_in,)`` or ``(T, d_in)`` (tokens) for dense;
        ``(..., C)`` for diag.
      strides, padding: as ``flax.linen.Conv`` (conv only). ``padding`` is
        ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), (lo, hi))``.
      kernel_in_ndim: number of leading kernel axes that are input axes (dense
        only): 1 for ``nn.Dense``; 1 for the query/key/value kernels of
        ``nn.MultiHeadDotProductAttention`` ``(d, heads, head_dim)``; 2 for its
        output kernel ``(heads, head_dim, d)``.
      residual: the layer sits on a residual branch whose shortcut is the
        identity, so that Eq. 2's reference matrix M_i may be the identity
        (what ``jaxnorm.norms`` does with it is documented there).
      lipschitz: rho_i, the Lipschitz constant of the nonlinearity that follows
        the layer (1 for ReLU; see ``jaxnorm.norms`` for GELU and softmax).
      var_path, eps: BatchNorm only: path to the running variance and the
        normalizer's epsilon (the eval-mode map is ``scale / sqrt(var + eps)``).
      fold_into: diag only: names of the conv/dense entries whose kernels absorb
        this per-channel scale when ``jaxnorm.norms`` folds normalization layers
        (``norm_layers="fold"``). An entry *before* the diag is the layer that
        feeds it (BatchNorm after a conv: the scale multiplies its output
        channels); entries *after* it read its output (pre-LN LayerNorm before
        q/k/v or an MLP: the scale multiplies their input features).
      stack: dense only: entries with the same non-empty ``stack`` name that read
        the same input (attention q, k, v) may be counted as one operator, their
        kernels concatenated along the output axis (``jaxnorm.norms``,
        ``attention="stacked"``); the stacked operator is named ``stack``.
    """

    name: str
    kind: str
    path: tuple[str, ...]
    input_shape: tuple[int, ...]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    kernel_in_ndim: int = 1
    residual: bool = False
    lipschitz: float = 1.0
    var_path: tuple[str, ...] | None = None
    eps: float = 0.0
    fold_into: tuple[str, ...] = ()
    stack: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LinearLayer {self.name!r}: kind={self.kind!r}; allowed: {KINDS}")
        if self.kind == "conv" and len(self.input_shape) != 3:
            raise ValueError(
                f"LinearLayer {self.name!r}: a conv needs input_shape (H, W, C_in), got {self.input_shape}"
            )
        if self.fold_into and self.kind != "diag":
            raise ValueError(f"LinearLayer {self.name!r}: fold_into is for diag entries, not {self.kind!r}")
        if self.stack and self.kind != "dense":
            raise ValueError(f"LinearLayer {self.name!r}: stack is for dense entries, not {self.kind!r}")


Layout = tuple[LinearLayer, ...]


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Returns ``tree[path[0]][path[1]]...``, with an error that names the missing key."""
    node = tree
    for depth, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, TypeError) as err:
            have = sorted(node.keys()) if isinstance(node, Mapping) else type(node).__name__
            raise KeyError(f"no {'/'.join(path[: depth + 1])!r} in the variables; found {have}") from err
    return node
