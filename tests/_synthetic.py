"""Small synthetic vesicle volumes for the post-processing tests (not the full simulator).

Each vesicle is a spherical dark lipid bilayer (a soft band of thickness ``thickness`` whose outer
edge is at ``radius``), a bright Fresnel fringe just outside it, on a flat background with
(optionally correlated) Gaussian noise. The ground-truth radius is the outer edge of the membrane,
as in :class:`cryoves.VesicleTable`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.special import erf


def shell_profile(d, radius, thickness=2.0, blur=0.6, fringe=0.35, contrast=1.0):
    """Radial intensity of one vesicle at distance ``d`` from its centre (background 0)."""
    d = np.asarray(d, dtype=np.float64)
    s = np.sqrt(2.0) * blur
    band = 0.5 * (erf((d - (radius - thickness)) / s) - erf((d - radius) / s))
    halo = fringe * np.exp(-(((d - radius - 1.3) / 0.9) ** 2))
    return contrast * (-band + halo)


def draw_vesicles(shape, centers, radii, *, thickness=2.0, noise=0.6, blur=0.6, fringe=0.35,
                  contrast=1.0, correlated=0.7, seed=0, offset=0.0, scale=1.0, thicknesses=None,
                  contrasts=None):
    """Render vesicles into a float32 volume.

    Parameters
    ----------
    shape : (Z, Y, X)
    centers : (N, 3) array of float
    radii : (N,) array of float
        Outer membrane radius in voxels.
    thickness, blur, fringe, contrast : float
        Membrane band thickness (voxels), edge blur (sigma, voxels), fringe amplitude, membrane depth.
    noise : float
        Noise standard deviation (after smoothing), in units of the membrane depth.
    correlated : float
        Sigma (voxels) of the Gaussian that correlates the noise (0 for white noise).
    seed : int
    offset, scale : float
        Final affine intensity transform (tests that the code is scale-invariant).
    thicknesses, contrasts : (N,) arrays, optional
        Per-vesicle overrides.
    """
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, dtype=np.float64)
    centers = np.asarray(centers, float).reshape(-1, 3)
    radii = np.asarray(radii, float).reshape(-1)
    for i, (c, r) in enumerate(zip(centers, radii)):
        t = thickness if thicknesses is None else thicknesses[i]
        k = contrast if contrasts is None else contrasts[i]
        ext = r + 5
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += shell_profile(d, r, t, blur, fringe, k)
    n = rng.standard_normal(shape)
    if correlated > 0:
        n = ndi.gaussian_filter(n, correlated)
        n /= n.std()
    vol += noise * n
    return (vol * scale + offset).astype(np.float32)


def probability_from_spheres(shape, centers, radii, *, softness=0.8, peak=0.999, noise=0.0, seed=0):
    """A probability-like map: ~peak inside each sphere, falling off smoothly at its radius."""
    rng = np.random.default_rng(seed)
    p = np.zeros(shape, dtype=np.float64)
    centers = np.asarray(centers, float).reshape(-1, 3)
    for c, r in zip(centers, np.asarray(radii, float).reshape(-1)):
        ext = r + 6
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        v = peak / (1.0 + np.exp((d - r) / softness))
        box = p[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(box, v, out=box)
    if noise:
        p += noise * rng.standard_normal(shape)
    return np.clip(p, 0, 1).astype(np.float32)


def random_vesicles(shape, n, *, r_range=(7.0, 11.0), min_gap=3.0, margin=None, seed=0, max_tries=20000):
    """Non-overlapping random vesicle centres and radii (voxels) inside ``shape``."""
    rng = np.random.default_rng(seed)
    centers, radii = [], []
    tries = 0
    while len(centers) < n and tries < max_tries:
        tries += 1
        r = rng.uniform(*r_range)
        m = (r + 4) if margin is None else margin
        c = np.array([rng.uniform(m, s - 1 - m) for s in shape])
        if any(np.linalg.norm(c - c2) < r + r2 + min_gap for c2, r2 in zip(centers, radii)):
            continue
        centers.append(c)
        radii.append(r)
    return np.array(centers).reshape(-1, 3), np.array(radii)


def weakened_probability(centers, radii, shape, *, n_confident=3, level=(0.5, 0.9), holes=0.3,
                         background=0.05, seed=0):
    """What a network gives on a tomogram unlike its training data: most vesicles at p 0.5-0.9.

    Every vesicle gets the shape of a well-trained network's output (1 at the centre, 0.8 at
    the outer radius, a one-voxel fall-off outside, as ``conftest.oracle_probability_map``),
    but only the first ``n_confident`` keep that confidence (peak 0.99); the others are scaled
    to a peak drawn from ``level`` and lose a fraction ``holes`` of their voxels to holes (a
    smooth random field, so the holes are blobs of a few voxels, not salt noise). The
    background is ``background`` plus smooth noise of +-0.03.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    centers = np.asarray(centers, float).reshape(-1, 3)
    radii = np.asarray(radii, float).reshape(-1)
    field = ndi.gaussian_filter(rng.standard_normal(shape), 1.5)
    field /= field.std()
    cut = np.quantile(field, holes)
    bg = background + 0.03 * np.clip(ndi.gaussian_filter(rng.standard_normal(shape), 2.0) * 4.0, -1, 1)
    p = bg.astype(np.float64)
    for i, (c, r) in enumerate(zip(centers, radii)):
        ext = r + 5
        lo = np.maximum(np.floor(c - ext).astype(int), 0)
        hi = np.minimum(np.ceil(c + ext).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        v = np.where(d <= r, 1.0 - 0.2 * (d / r) ** 6, 0.8 * np.exp(-0.5 * (d - r) ** 2))
        sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        if i < n_confident:
            v = 0.99 * v
        else:
            v = rng.uniform(*level) * v
            v = np.where(field[sl] < cut, 0.0, v)
        np.maximum(p[sl], v, out=p[sl])
    return np.clip(p, 0, 1).astype(np.float32)
