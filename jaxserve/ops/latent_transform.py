"""Orthogonal transforms of an MLA model's latent, folded into its weights before the latent is
split over devices (TPLA, arXiv 2508.15881).

Under `attention="tpla"` each device attends over its slice of the latent; a latent whose
energy sits in a few of its dims splits badly (one device's scores carry most of the signal).
An orthogonal R spreads it: the model caches c_kv @ R instead of c_kv, and since R^T R = I,
every exact score and value is unchanged. Folded at load, per layer:

    kv_a_proj  W_a  -> W_a @ R              (RMSNorm is rotation invariant: rms(u R) = rms(u))
    kv_a_norm  g    -> 1                    (the norm's scale moves into the up-projections)
    k_b_proj   W_UK -> R^T diag(g) W_UK     (and v_b_proj W_UV alike)

"hadamard": R = H / sqrt(L), the Sylvester Hadamard matrix (kv_lora_rank L a power of two).
"pca": per layer, the eigenvectors of the covariance of the latent the folded model caches
(c_kv with the norm's scale divided out), measured on a calibration text (`pca_rotation`; the
text is run through the exact model by `jaxserve.api`). Choice: the eigenvectors sorted by
eigenvalue are dealt round-robin to the slices, the k-th largest to slice k mod tp, so every
device gets the same share of large and small components and the slices' scores agree as far
as the data lets them (sorted blocks would give slice 0 most of the variance).
"none": the weights as they are. Pure array code: it runs under jit on the placed parameters.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxserve.config import ConfigError, ModelConfig

_LATENT_PARAMS = re.compile(r"^layers/(\d+)/attn/(kv_a_proj|kv_a_norm/scale|k_b_proj|v_b_proj)$")


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"latent_transform 'hadamard' needs kv_lora_rank a power of two, "
                          f"got {n}; use latent_transform='none'")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def pca_rotation(latents: np.ndarray, slices: int) -> np.ndarray:
    """latents [tokens, L] of one layer -> R [L, L] orthogonal, its columns the covariance's
    eigenvectors, largest first, dealt round-robin over `slices` contiguous column blocks."""
    tokens, width = latents.shape
    if width % slices:
        raise ConfigError(f"latent_transform 'pca': {slices} slices do not divide "
                          f"kv_lora_rank {width}")
    x = np.asarray(latents, np.float64)
    x = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(x.T @ x / max(tokens - 1, 1))
    order = np.argsort(values)[::-1]
    k = np.arange(width)
    columns = (k % slices) * (width // slices) + k // slices
    rotation = np.empty((width, width))
    rotation[:, columns] = vectors[:, order]
    return rotation


def transform_matrix(config: ModelConfig, transform: str,
                     pca: np.ndarray | None = None) -> np.ndarray | None:
    """The rotation to fold: [L, L] for every layer, or [layers, L, L] ("pca": `pca`, the
    per-layer rotations of `pca_rotation`)."""
    if transform == "none":
        return None
    if transform == "hadamard":
        return hadamard(config.kv_lora_rank)
    if transform == "pca":
        want = (config.num_layers, config.kv_lora_rank, config.kv_lora_rank)
        if pca is None or pca.shape != want:
            raise ConfigError(f"latent_transform 'pca' needs per-layer rotations of shape "
                              f"{want} from a calibration text, got "
                              f"{None if pca is None else pca.shape}")
        return pca
    raise ConfigError(f"latent_transform must be 'hadamard', 'pca' or 'none', got {transform!r}")


def fold_transform(params: dict, rotation: np.ndarray) -> dict:
    """Flat float params of an MLA model -> the same model caching c_kv @ `rotation` ([L, L]
    for every layer, or [layers, L, L] one per layer)."""
    out = dict(params)
    layers = sorted({int(m.group(1)) for name in params if (m := _LATENT_PARAMS.match(name))})
    for i in layers:
        p = f"layers/{i}/attn/"
        r = jnp.asarray(rotation[i] if rotation.ndim == 3 else rotation,
                        params[p + "kv_a_proj"].dtype)
        gain = params[p + "kv_a_norm/scale"]
        out[p + "kv_a_proj"] = params[p + "kv_a_proj"] @ r
        out[p + "kv_a_norm/scale"] = jnp.ones_like(gain)
        for name in ("k_b_proj", "v_b_proj"):  # [latent, heads, dim]
            out[p + name] = jnp.einsum("ml,m,mhd->lhd", r, gain, params[p + name])
    return out


def latent_params(names) -> list[str]:
    """The parameters `fold_transform` rewrites."""
    return [n for n in names if _LATENT_PARAMS.match(n)]
