"""Realistic simulated cryo-electron tomograms of a presynaptic terminal, with ground truth.

The simulator is the ground truth for tests, training and benchmarks. It follows the
physics of cryo-ET rather than drawing spheres in noise:

1. **Phantom** (defined in nm, rendered on the voxel grid as a map of the electrostatic
   potential above vitreous ice, in volts): crowded cytosol (protein-like blobs of three
   sizes and ribosome-like complexes), a cluster of synaptic vesicles packed against the
   active zone of a plasma membrane (lipid bilayers drawn as two dense head-group
   leaflets around a light hydrophobic core, lumen slightly denser than the cytosol,
   membrane proteins on the surface, connectors between close vesicles and tethers to
   the membrane), a synaptic cleft and postsynaptic membrane with a density, and
   distractors: endosome-like compartments (with intraluminal vesicles), ellipsoidal and
   tubular compartments, a mitochondrion (double membrane, dense matrix, cristae),
   microtubules and 10 nm gold beads.
2. **Tilt series**: line integrals through the volume about the Y axis (Joseph's
   projector as one sparse matrix for all tilts, applied to every Y row at once).
3. **Image formation**: weak-phase approximation with the contrast transfer function
   (300 kV, Cs 2.7 mm, amplitude contrast 0.07, defocus -6 to -10 um by default,
   B-factor envelope), inelastic attenuation that grows with the path length at high
   tilt, gold beads as strong amplitude objects, and Poisson shot noise at a given
   electron dose (or Gaussian noise at a given projection SNR).
4. **Reconstruction**: weighted back-projection (ramp filter with IMOD's radial
   Gaussian fall-off, pixel-driven linear-interpolation back-projector).

Optional physics, all off by default (see :class:`SimulationParams`): 200 kV, ice beyond
the volume, radiation damage growing with the accumulated dose, tilt-series alignment
error, per-tilt defocus, phase flipping, detector read noise and correlated noise, other
bilayer profiles (leaflet width, head-group separation, asymmetry, blur, flat-topped
leaflets), textured lumens, SIRT, Hamming and Shepp-Logan filters, and reconstruction on a
finer grid then binning. :func:`random_params` draws most of them for training and never
the ones in :data:`HELD_OUT_FROM_TRAINING`.

The result shows what real tomograms show: membranes and proteins dark (low values),
bright Fresnel fringes next to membranes, grainy noise and the missing-wedge elongation
along Z (membranes facing the beam fade).

Ground truth: the vesicle table (outer radius, membrane thickness), the label volume
rendered from it with :func:`cryoves.render_labels` (so both agree exactly) and a region
mask (Pyto convention: 1 = presynaptic cytoplasm around the vesicle cluster).

Examples
--------
>>> from cryoves.simulate import simulate_tomogram
>>> sim = simulate_tomogram(shape=(48, 96, 96), voxel_size=2.0, seed=1)
>>> sim.tomogram.shape, sim.tomogram.dtype.name
((48, 96, 96), 'float32')
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import scipy.fft as sfft
from scipy import sparse
from scipy.special import erf

from cryoves._progress import ProgressCallback, report
from cryoves.table import VesicleTable, render_labels

__all__ = ["SimulationParams", "Simulation", "simulate_tomogram", "random_params", "HELD_OUT_FROM_TRAINING",
           "tilt_angles", "ctf_1d", "electron_wavelength_nm"]

# --------------------------------------------------------------------------------------
# physical constants and material potentials (volts above vitreous ice)
# --------------------------------------------------------------------------------------
_M0C2_EV = 510998.95          # electron rest energy, eV
_V_PROTEIN = 1.6              # protein vs ice
_V_RNA = 2.6                  # ribosome-like complexes (RNA-rich, denser)
_V_HEAD = 3.4                 # lipid head-group leaflet peak
_V_CORE = -0.35               # hydrophobic core of a bilayer (lighter than water)
_V_GOLD = 10.0                # gold bead phase term (the amplitude term dominates)
_MU_GOLD = 0.09               # amplitude attenuation of gold, 1/nm of chord
_N_WORKERS = 2                # threads for scipy.fft
_TILT_SCHEMES = ("dose-symmetric", "sequential")
_MEMBRANE_MODELS = ("gaussian", "slab")
_RECONSTRUCTIONS = ("wbp", "sirt")
_RECON_FILTERS = ("ramp", "hamming", "shepp-logan")


def electron_wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength in nm for an acceleration voltage in kV."""
    v = float(voltage_kv) * 1e3
    return 1.226426 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def _interaction_constant(voltage_kv: float) -> float:
    """Interaction constant sigma in rad / (V nm)."""
    v = float(voltage_kv) * 1e3
    lam = electron_wavelength_nm(voltage_kv)
    return 2 * math.pi / (lam * v) * (_M0C2_EV + v) / (2 * _M0C2_EV + v)


# --------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------
@dataclass
class SimulationParams:
    """All knobs of the simulator (lengths in nm, angles in degrees).

    Every field can be randomised for training (see :func:`random_params`). Values are
    checked on construction (and by :func:`dataclasses.replace`); a bad value raises
    ``ValueError`` saying what is allowed.

    Parameters
    ----------
    voxel_size : float
        Voxel size in nm (isotropic), 0.5 to 5 (real binned tomograms: 0.7 to 2.5).
    seed : int
        Seed of the random generator; the simulation is a deterministic function of the
        parameters, the shape and this seed.
    tilt_range : float
        Maximum tilt angle in degrees; the series runs from ``-tilt_range`` to
        ``+tilt_range`` (default 60).
    tilt_step : float
        Angular increment in degrees (default 2).
    defocus_um : float
        Defocus in micrometres, negative = underfocus (default -8).
    voltage_kv, cs_mm, amplitude_contrast : float
        Microscope: 300 kV, spherical aberration 2.7 mm, amplitude contrast 0.07.
    bfactor : float
        Envelope B-factor in A^2 (damps high frequencies: exp(-B k^2 / 4)); it stands for
        everything that limits the resolution of a real tomogram (coherence, drift,
        tilt-series alignment), default 2500 A^2.
    dose : float
        Total electron dose of the tilt series in e/A^2 (split evenly over the tilts);
        sets the Poisson noise when ``snr`` is None.
    dqe : float
        Detective quantum efficiency of the detector (0-1]: the noise is that of
        ``dose * dqe`` electrons (also absorbs beam-induced motion and alignment losses).
    snr : float or None
        If given, Gaussian noise with variance = (signal variance of the projections) /
        ``snr`` replaces the dose-based Poisson noise.
    mean_free_path_nm : float
        Inelastic mean free path; the zero-loss signal per tilt falls as
        exp(-thickness / (cos(tilt) * mfp)), so high tilts are noisier.
    n_vesicles : int or None
        Number of synaptic vesicles to place; None = from ``vesicle_fraction``. If fewer
        fit into the volume, as many as fit are placed (with a warning).
    vesicle_fraction : float
        With ``n_vesicles=None``: fraction of the tomogram volume filled by vesicles.
    radius_mean_nm, radius_sd_nm, radius_min_nm, radius_max_nm : float
        Outer vesicle radius: normal distribution clipped to [min, max] (default
        20 +- 2.5 nm in [15, 30]).
    membrane_thickness_nm, membrane_thickness_sd_nm : float
        Bilayer thickness of vesicles (default 4.5 +- 0.25 nm).
    lumen_contrast : float
        Vesicle lumen potential above the mean cytosol, V (slightly denser).
    cluster_jitter : float
        0 = the tightest packing against the active zone, larger = looser cluster.
    crowding : float
        Multiplier of the cytosolic protein volume fraction (1 = 15 %).
    n_ribosomes : int or None
        Ribosome-like dense complexes; None = from the volume and ``crowding``.
    plasma_membrane, postsynaptic : bool
        Draw the presynaptic plasma membrane with its active zone; draw the synaptic
        cleft, postsynaptic membrane and density beyond it.
    n_endosomes, n_dense_core, n_ellipsoids, n_tubes, n_mitochondria, n_microtubules, n_gold : int
        Distractor counts (placed where they fit; some may be cut by the border):
        endosome-like compartments, dense-core vesicles (not labelled), ellipsoidal and
        tubular compartments, mitochondria, microtubules, 10 nm gold beads.
    connector_probability : float
        Probability that a pair of close vesicles (gap 2-12 nm) is linked by connectors.
    radial_cutoff, radial_falloff : float
        Weighted back-projection radial filter (IMOD convention, cycles/pixel).
    invert_contrast : bool
        If True, return the tomogram with inverted contrast (membranes bright).

    The options below make the simulator's fingerprint broader. Every one of them is
    off by default (the default output is unchanged), and the random draws they need
    come from a second generator seeded by ``seed``, so switching one on changes
    nothing else (the phantom and the shot noise stay the same).

    extra_ice_nm : float
        Ice beyond the volume: the specimen slab is this many nm thicker than the volume
        (``shape[0] * voxel_size``), half above and half below it, 0 to 1000 (default 0).
        The thicker slab lengthens the inelastic path (more attenuation, more noise at
        high tilt) and adds the projected amorphous background of the material in it
        (see ``ice_crowding``).
    ice_crowding : float
        Protein-like density of the extra slab as a multiplier of the cytosolic
        crowding (0 = pure ice, 1 = cytosol), default 0.3; it is drawn independently in
        every tilt image (blobs of 2 nm sigma), so it reconstructs as structured noise.
    damage_bfactor_per_dose : float
        Radiation damage: each tilt image gets an extra B-factor of this many A^2 per
        e/A^2 of dose accumulated before it (0 = off; about 20-25 A^2 per e/A^2 matches
        the critical exposure of Grant & Grigorieff (2015) at 2-3 nm resolution).
    tilt_scheme : {"dose-symmetric", "sequential"}
        Acquisition order that sets the accumulated dose per tilt: dose-symmetric
        (0, +step, -step, -2 step, +2 step, ...) or sequential (-tilt_range to +tilt_range).
    alignment_shift_nm : float
        Tilt-series alignment error: standard deviation of a random shift (nm, along
        both image axes) of every tilt image before the reconstruction (0 = off).
    alignment_rotation_deg : float
        Standard deviation of a random in-plane rotation of every tilt image (degrees).
    defocus_spread_um : float
        Every tilt image gets its own defocus, uniform in ``defocus_um +- spread / 2``
        (astigmatism-free); 0 = the same defocus in every image.
    ctf_correction : bool
        Phase flipping: each tilt image is multiplied by the sign of its own CTF before
        the reconstruction (default False: no CTF correction).
    read_noise_e : float
        Gaussian read noise of the detector, standard deviation in electrons per pixel
        per tilt image, added to the shot noise (dose-based noise only; 0 = a counting
        detector without read noise).
    noise_correlation_px : float
        Correlated detector noise: the noise (not the signal) of each tilt image is
        blurred by a Gaussian MTF of this sigma in pixels and rescaled to its former
        per-pixel standard deviation, which moves noise power to low frequencies
        (0 = white noise).
    membrane_model : {"gaussian", "slab"}
        Head-group leaflet profile of every lipid bilayer: Gaussian leaflets (default)
        or flat-topped slabs with sharp error-function edges and the same integrated
        density.
    leaflet_width : float
        Head-group leaflet width (Gaussian sigma) as a fraction of the bilayer
        thickness, 0.04 to 0.25 (default 0.11).
    headgroup_separation : float
        Distance between the two head-group peaks as a fraction of the bilayer
        thickness, 0.3 to 0.8 (default 0.6: peaks 0.2 and 0.8 of the thickness deep).
    bilayer_asymmetry : float
        Asymmetric bilayer: the outer leaflet gets ``1 + a`` times, the inner ``1 - a``
        times the head-group density, -0.6 to 0.6 (default 0).
    membrane_blur_nm : float
        Extra Gaussian blur of the bilayer profile in nm (0 = sharp, the default).
    lumen_texture : float
        Volume fraction (0 to 0.3) of small protein-like granules inside the lumen of
        synaptic vesicles (0 = a uniform lumen, the default).
    vesicle_border_cut : float
        How far a synaptic vesicle may reach out of the field of view (the Y and X faces
        of the volume), as a fraction of its diameter: 0 (the default) keeps every vesicle
        whole, 0.5 lets a centre lie on a face. Real tomograms are cropped views, so
        vesicles cut by their borders are common; the Z faces keep the specimen slab whole.
    reconstruction : {"wbp", "sirt"}
        Weighted back-projection (default), or SIRT (simultaneous iterative
        reconstruction, ``sirt_iterations`` iterations of x += C A^T R (p - A x) with the
        Joseph projector A and its inverse row and column sums R, C).
    recon_filter : {"ramp", "hamming", "shepp-logan"}
        Window of the weighted back-projection filter (times the radial cut-off and
        fall-off): the plain ramp (default), ramp * Hamming window, or ramp * sinc
        (Shepp-Logan).
    sirt_iterations : int
        Iterations of the SIRT reconstruction, 1 to 200 (default 10).
    recon_binning : int
        1 (default), 2 or 3: simulate the phantom, tilt series and reconstruction on a
        grid ``recon_binning`` times finer (voxel ``voxel_size / recon_binning``), then
        average blocks of ``recon_binning``^3 voxels onto the output grid (as real
        tomograms are reconstructed from unbinned images and binned). The cost grows
        with ``recon_binning``^3.
    """

    voxel_size: float = 1.5
    seed: int = 0
    tilt_range: float = 60.0
    tilt_step: float = 2.0
    defocus_um: float = -8.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor: float = 2500.0
    dose: float = 100.0
    dqe: float = 0.5
    snr: Optional[float] = None
    mean_free_path_nm: float = 350.0
    n_vesicles: Optional[int] = None
    vesicle_fraction: float = 0.07
    radius_mean_nm: float = 20.0
    radius_sd_nm: float = 2.5
    radius_min_nm: float = 15.0
    radius_max_nm: float = 30.0
    membrane_thickness_nm: float = 4.5
    membrane_thickness_sd_nm: float = 0.25
    lumen_contrast: float = 0.12
    cluster_jitter: float = 0.15
    crowding: float = 1.0
    n_ribosomes: Optional[int] = None
    plasma_membrane: bool = True
    postsynaptic: bool = True
    n_endosomes: int = 1
    n_dense_core: int = 1
    n_ellipsoids: int = 2
    n_tubes: int = 1
    n_mitochondria: int = 1
    n_microtubules: int = 1
    n_gold: int = 4
    connector_probability: float = 0.5
    radial_cutoff: float = 0.35
    radial_falloff: float = 0.035
    invert_contrast: bool = False
    extra_ice_nm: float = 0.0
    ice_crowding: float = 0.3
    damage_bfactor_per_dose: float = 0.0
    tilt_scheme: str = "dose-symmetric"
    alignment_shift_nm: float = 0.0
    alignment_rotation_deg: float = 0.0
    defocus_spread_um: float = 0.0
    ctf_correction: bool = False
    read_noise_e: float = 0.0
    noise_correlation_px: float = 0.0
    membrane_model: str = "gaussian"
    leaflet_width: float = 0.11
    headgroup_separation: float = 0.6
    bilayer_asymmetry: float = 0.0
    membrane_blur_nm: float = 0.0
    lumen_texture: float = 0.0
    vesicle_border_cut: float = 0.0
    reconstruction: str = "wbp"
    recon_filter: str = "ramp"
    sirt_iterations: int = 10
    recon_binning: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if a value is out of its allowed range."""
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"SimulationParams.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(v):
                raise ValueError(f"SimulationParams.{name}={v!r} must be a finite number")
            return float(v)

        def count(name, lo=0, hi=10000, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"SimulationParams.{name}={v!r} must be an integer")
            check(name, lo <= v <= hi, f"must be between {lo} and {hi}")

        check("voxel_size", 0.5 <= num("voxel_size") <= 5.0,
              "give the voxel size in nm, between 0.5 and 5 (real tomograms: 0.7-2.5 nm; "
              "did you pass Angstrom?)")
        count("seed", 0, 2**63 - 1)
        check("tilt_range", 5.0 <= num("tilt_range") <= 89.0, "maximum tilt in degrees, 5 to 89")
        check("tilt_step", 0.1 <= num("tilt_step") <= self.tilt_range,
              "tilt increment in degrees, 0.1 to tilt_range")
        check("defocus_um", -30.0 <= num("defocus_um") <= -0.2,
              "defocus in micrometres, negative for underfocus (e.g. -8), between -30 and -0.2")
        check("voltage_kv", 60.0 <= num("voltage_kv") <= 1000.0, "acceleration voltage in kV, 60 to 1000")
        check("cs_mm", 0.0 <= num("cs_mm") <= 10.0, "spherical aberration in mm, 0 to 10")
        check("amplitude_contrast", 0.0 <= num("amplitude_contrast") < 1.0, "a fraction in [0, 1)")
        check("bfactor", 0.0 <= num("bfactor") <= 20000.0, "B-factor in A^2, 0 to 20000")
        check("dose", 0.1 <= num("dose") <= 10000.0, "total dose in e/A^2, 0.1 to 10000")
        check("dqe", 0.01 <= num("dqe") <= 1.0, "a fraction in [0.01, 1]")
        if self.snr is not None:
            check("snr", 1e-4 <= num("snr") <= 1e6, "projection SNR, a positive number (or None for dose-based noise)")
        check("mean_free_path_nm", num("mean_free_path_nm") > 10.0, "inelastic mean free path in nm, > 10")
        count("n_vesicles", 0, 65535, optional=True)
        check("vesicle_fraction", 0.0 <= num("vesicle_fraction") <= 0.4, "volume fraction, 0 to 0.4")
        for name in ("radius_mean_nm", "radius_sd_nm", "radius_min_nm", "radius_max_nm"):
            num(name)
        check("radius_min_nm", 3.0 <= self.radius_min_nm, "outer radius in nm, at least 3")
        check("radius_max_nm", self.radius_min_nm <= self.radius_max_nm <= 200.0,
              f"at least radius_min_nm={self.radius_min_nm} and at most 200 nm")
        check("radius_mean_nm", self.radius_min_nm <= self.radius_mean_nm <= self.radius_max_nm,
              f"between radius_min_nm={self.radius_min_nm} and radius_max_nm={self.radius_max_nm}")
        check("radius_sd_nm", self.radius_sd_nm >= 0, "a standard deviation in nm, >= 0")
        check("membrane_thickness_nm", 2.0 <= num("membrane_thickness_nm") <= 10.0
              and self.membrane_thickness_nm < 0.6 * self.radius_min_nm,
              "bilayer thickness in nm, 2 to 10 and below 0.6 * radius_min_nm")
        check("membrane_thickness_sd_nm", 0.0 <= num("membrane_thickness_sd_nm") <= 2.0, "0 to 2 nm")
        check("lumen_contrast", -2.0 <= num("lumen_contrast") <= 2.0, "volts, -2 to 2")
        check("cluster_jitter", 0.0 <= num("cluster_jitter") <= 10.0, "0 (tight) to 10 (loose)")
        check("crowding", 0.0 <= num("crowding") <= 3.0, "a multiplier, 0 to 3")
        count("n_ribosomes", 0, 100000, optional=True)
        for name in ("n_endosomes", "n_dense_core", "n_ellipsoids", "n_tubes", "n_mitochondria", "n_microtubules", "n_gold"):
            count(name, 0, 1000)
        check("connector_probability", 0.0 <= num("connector_probability") <= 1.0, "a probability")
        check("radial_cutoff", 0.01 <= num("radial_cutoff") <= 0.5, "cycles/pixel, 0.01 to 0.5")
        check("radial_falloff", 0.0 <= num("radial_falloff") <= 0.5, "cycles/pixel, 0 to 0.5")
        for name in ("plasma_membrane", "postsynaptic", "invert_contrast", "ctf_correction"):
            check(name, isinstance(getattr(self, name), (bool, np.bool_)), "must be True or False")
        check("extra_ice_nm", 0.0 <= num("extra_ice_nm") <= 1000.0, "nm of ice beyond the volume, 0 to 1000")
        check("ice_crowding", 0.0 <= num("ice_crowding") <= 3.0, "a multiplier of the cytosolic crowding, 0 to 3")
        check("damage_bfactor_per_dose", 0.0 <= num("damage_bfactor_per_dose") <= 200.0,
              "A^2 per e/A^2 of accumulated dose, 0 (off) to 200")
        check("alignment_shift_nm", 0.0 <= num("alignment_shift_nm") <= 20.0, "nm, 0 (off) to 20")
        check("alignment_rotation_deg", 0.0 <= num("alignment_rotation_deg") <= 5.0, "degrees, 0 (off) to 5")
        check("defocus_spread_um", 0.0 <= num("defocus_spread_um") <= 10.0, "micrometres, 0 (off) to 10")
        if self.defocus_spread_um:
            check("defocus_spread_um", self.defocus_um + 0.5 * self.defocus_spread_um <= -0.2
                  and self.defocus_um - 0.5 * self.defocus_spread_um >= -30.0,
                  f"defocus_um +- spread / 2 must stay within -30 to -0.2 (defocus_um={self.defocus_um})")
        check("read_noise_e", 0.0 <= num("read_noise_e") <= 1000.0, "electrons per pixel, 0 (off) to 1000")
        if self.read_noise_e and self.snr is not None:
            check("read_noise_e", False, "read noise needs dose-based noise: set snr=None or read_noise_e=0")
        check("noise_correlation_px", 0.0 <= num("noise_correlation_px") <= 5.0, "pixels, 0 (white noise) to 5")
        for name, choices in (("tilt_scheme", _TILT_SCHEMES), ("membrane_model", _MEMBRANE_MODELS),
                              ("reconstruction", _RECONSTRUCTIONS), ("recon_filter", _RECON_FILTERS)):
            check(name, isinstance(getattr(self, name), str) and getattr(self, name) in choices,
                  f"one of {', '.join(repr(c) for c in choices)}")
        check("leaflet_width", 0.04 <= num("leaflet_width") <= 0.25,
              "a fraction of the bilayer thickness, 0.04 to 0.25")
        check("headgroup_separation", 0.3 <= num("headgroup_separation") <= 0.8,
              "a fraction of the bilayer thickness, 0.3 to 0.8")
        check("bilayer_asymmetry", -0.6 <= num("bilayer_asymmetry") <= 0.6, "-0.6 to 0.6")
        check("membrane_blur_nm", 0.0 <= num("membrane_blur_nm") <= 3.0, "nm, 0 (sharp) to 3")
        check("lumen_texture", 0.0 <= num("lumen_texture") <= 0.3, "a volume fraction, 0 to 0.3")
        check("vesicle_border_cut", 0.0 <= num("vesicle_border_cut") <= 0.5,
              "a fraction of the vesicle diameter, 0 (whole) to 0.5 (centre on the face)")
        count("sirt_iterations", 1, 200)
        count("recon_binning", 1, 3)
        check("recon_binning", self.voxel_size / self.recon_binning >= 0.5 - 1e-9,
              f"voxel_size / recon_binning must be at least 0.5 nm (voxel_size={self.voxel_size})")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.generic):
                v = v.item()
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationParams":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SimulationParams fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class Simulation:
    """A simulated tomogram with its ground truth.

    Attributes
    ----------
    tomogram : ndarray of float32, (Z, Y, X)
        Weighted back-projection, normalised to mean 0 and standard deviation 1;
        membranes are dark unless ``params.invert_contrast``.
    labels : ndarray of uint16, (Z, Y, X)
        ``render_labels(table, shape)``: filled spheres of outer radius, id per vesicle.
    mask : ndarray of uint8, (Z, Y, X)
        1 = presynaptic cytoplasm around the vesicle cluster (Pyto), 0 elsewhere.
    table : VesicleTable
        The true vesicles, ``stage="truth"``, radius = outer radius (voxels), thickness =
        membrane thickness (voxels).
    voxel_size : float
        nm.
    params : SimulationParams
        The parameters used (with the actual voxel size and seed).
    tilt_angles : ndarray
        Tilt angles in degrees.
    n_requested : int
        Vesicles asked for; ``len(table)`` can be lower when the volume is too small.
    """

    tomogram: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    table: VesicleTable
    voxel_size: float
    params: SimulationParams
    tilt_angles: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_requested: int = 0


# --------------------------------------------------------------------------------------
# random parameters for training
# --------------------------------------------------------------------------------------
#: Simulator settings that :func:`random_params` never draws (it keeps their defaults), so
#: that an evaluation case can use a rendering the trained model has never seen: SIRT
#: reconstruction, the Shepp-Logan filter, reconstruction on a finer grid then binning,
#: flat-topped ("slab") head-group leaflets and correlated (blurred) detector noise.
HELD_OUT_FROM_TRAINING = {
    "reconstruction": "sirt",
    "recon_filter": "shepp-logan",
    "recon_binning": "2 or 3",
    "membrane_model": "slab",
    "noise_correlation_px": "> 0",
}


def random_params(rng: np.random.Generator | int | None = None, *,
                  voxel_size_range: tuple[float, float] = (0.7, 2.5),
                  snr_range: Optional[tuple[float, float]] = None,
                  dose_range: tuple[float, float] = (25.0, 180.0),
                  defocus_range_um: tuple[float, float] = (-10.0, -3.0),
                  **fixed) -> SimulationParams:
    """Draw a randomised parameter set (domain randomisation for training).

    The draws span the realistic range of every physics option of
    :class:`SimulationParams`: 200 or 300 kV, dose, defocus (and its spread over the
    series), tilt range and step, ice beyond the volume, radiation damage (both tilt
    schemes), tilt-series alignment error, CTF correction on or off, detector read noise,
    bilayer leaflet width, head-group separation, asymmetry and blur, lumen density and
    texture, vesicle radii 14-32 nm, crowding and distractors, WBP with the ramp or the
    Hamming filter. The settings in :data:`HELD_OUT_FROM_TRAINING` are never drawn.

    Parameters
    ----------
    rng : numpy Generator or int or None
        Source of randomness (an int seeds a new Generator).
    voxel_size_range : (float, float)
        Voxel size range in nm (log-uniform).
    snr_range : (float, float), optional
        If given, draw a projection SNR log-uniformly in this range (Gaussian noise);
        otherwise the noise comes from a dose drawn from ``dose_range`` (e/A^2).
    dose_range : (float, float)
        Total dose range, e/A^2 (log-uniform).
    defocus_range_um : (float, float)
        Defocus range in um (negative = underfocus).
    **fixed
        Any :class:`SimulationParams` field to fix instead of drawing.

    Returns
    -------
    SimulationParams
    """
    rng = np.random.default_rng(rng)

    def logu(lo, hi):
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    def maybe(prob, value, off=0.0):
        """``value`` with probability ``prob`` (drawn either way: a fixed number of draws)."""
        return value if rng.random() < prob else off

    r_mean = float(rng.uniform(16.0, 26.0))
    voltage = float(rng.choice([200.0, 300.0, 300.0]))
    defocus = float(rng.uniform(*defocus_range_um))
    spread = maybe(0.5, float(rng.uniform(0.0, 1.5)))
    spread = min(spread, 2.0 * (-0.2 - defocus), 2.0 * (defocus + 30.0))
    p = dict(
        voxel_size=logu(*voxel_size_range),
        seed=int(rng.integers(0, 2**31 - 1)),
        tilt_range=float(rng.choice([40.0, 45.0, 50.0, 54.0, 60.0, 60.0, 65.0, 70.0])),
        tilt_step=float(rng.choice([1.0, 2.0, 2.0, 3.0, 3.0])),
        defocus_um=defocus,
        defocus_spread_um=spread,
        voltage_kv=voltage,
        amplitude_contrast=float(rng.uniform(0.05, 0.10)),
        bfactor=float(rng.uniform(1000.0, 5000.0)),
        dqe=float(rng.uniform(0.3, 0.8)),
        dose=logu(*dose_range),
        snr=logu(*snr_range) if snr_range is not None else None,
        # the inelastic mean free path is shorter at 200 kV
        mean_free_path_nm=float(rng.uniform(250.0, 450.0)) * (0.8 if voltage < 250 else 1.0),
        extra_ice_nm=maybe(0.5, float(rng.uniform(0.0, 300.0))),
        ice_crowding=float(rng.uniform(0.0, 0.4)),
        damage_bfactor_per_dose=maybe(0.6, float(rng.uniform(0.0, 25.0))),
        tilt_scheme=str(rng.choice(["dose-symmetric", "sequential"])),
        alignment_shift_nm=maybe(0.6, float(rng.uniform(0.0, 1.5))),
        alignment_rotation_deg=maybe(0.4, float(rng.uniform(0.0, 0.5))),
        ctf_correction=bool(rng.random() < 0.4),
        read_noise_e=maybe(0.3, float(rng.uniform(0.0, 10.0))),
        leaflet_width=float(rng.uniform(0.08, 0.15)),
        headgroup_separation=float(rng.uniform(0.5, 0.7)),
        bilayer_asymmetry=maybe(0.5, float(rng.uniform(-0.25, 0.25))),
        membrane_blur_nm=maybe(0.5, float(rng.uniform(0.0, 0.8))),
        lumen_texture=maybe(0.4, float(rng.uniform(0.0, 0.15))),
        recon_filter=str(rng.choice(["ramp", "ramp", "hamming"])),
        vesicle_fraction=float(rng.uniform(0.02, 0.10)),
        radius_mean_nm=r_mean,
        radius_sd_nm=float(rng.uniform(1.5, 4.5)),
        radius_min_nm=14.0,
        radius_max_nm=32.0,
        membrane_thickness_nm=float(rng.uniform(3.8, 5.5)),
        lumen_contrast=float(rng.uniform(-0.1, 0.4)),
        cluster_jitter=float(rng.uniform(0.0, 1.5)),
        crowding=float(rng.uniform(0.5, 1.8)),
        plasma_membrane=bool(rng.random() < 0.85),
        postsynaptic=bool(rng.random() < 0.6),
        n_endosomes=int(rng.integers(0, 3)),
        n_dense_core=int(rng.integers(0, 3)),
        n_ellipsoids=int(rng.integers(0, 4)),
        n_tubes=int(rng.integers(0, 3)),
        n_mitochondria=int(rng.integers(0, 2)),
        n_microtubules=int(rng.integers(0, 3)),
        n_gold=int(rng.integers(0, 8)),
        connector_probability=float(rng.uniform(0.2, 0.8)),
        radial_cutoff=float(rng.uniform(0.3, 0.5)),
        invert_contrast=False,
        # drawn last, so that the draws above are those of earlier versions
        vesicle_border_cut=maybe(0.5, float(rng.uniform(0.0, 0.5))),
    )
    p["tilt_step"] = min(p["tilt_step"], p["tilt_range"])
    p.update(fixed)
    if p["snr"] is not None and "read_noise_e" not in fixed:
        p["read_noise_e"] = 0.0        # read noise belongs to dose-based noise
    return SimulationParams(**p)


# --------------------------------------------------------------------------------------
# small geometry helpers
# --------------------------------------------------------------------------------------
def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _random_unit(rng, n=None):
    v = rng.normal(size=(3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _smooth_step(x, w):
    """~1 for x << 0, ~0 for x >> 0 (error-function edge of width w)."""
    return 0.5 * (1.0 - erf(x / (math.sqrt(2.0) * w)))


class _Grid:
    """The padded rendering grid: shape (Z, Y, Xp); x index j = x_vox + pad."""

    def __init__(self, shape, voxel_size, pad):
        self.shape = tuple(int(s) for s in shape)          # unpadded
        self.v = float(voxel_size)
        self.pad = int(pad)
        self.pshape = (self.shape[0], self.shape[1], self.shape[2] + 2 * self.pad)
        self.pot = np.zeros(self.pshape, dtype=np.float32)   # potential, V
        # region codes for the crowding: 0 cytosol, 1 excluded, 2 matrix, 3 lumen,
        # 4 extracellular, 5 cleft, 6 postsynaptic cytosol
        self.code = np.zeros(self.pshape, dtype=np.uint8)
        # voxel-size-dependent softening of thin features (anti-aliasing)
        self.soft = 0.35 * self.v
        # bilayer profile variant: None = the default two Gaussian leaflets, else
        # (model, leaflet_width, headgroup_separation, asymmetry, blur_nm)
        self.membrane = None

    def extent_nm(self):
        """(lo, hi) corners of the padded grid in nm (z, y, x)."""
        lo = np.array([0.0, 0.0, -self.pad * self.v])
        hi = np.array([(self.shape[0] - 1) * self.v, (self.shape[1] - 1) * self.v,
                       (self.shape[2] - 1 + self.pad) * self.v])
        return lo, hi

    def box(self, lo_nm, hi_nm):
        """Slices and broadcast nm coordinates (zz, yy, xx) of the grid inside [lo, hi]."""
        lo = np.floor(np.asarray(lo_nm) / self.v).astype(int)
        hi = np.ceil(np.asarray(hi_nm) / self.v).astype(int) + 1
        lo[2] += self.pad
        hi[2] += self.pad
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.pshape)
        if np.any(hi <= lo):
            return None
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz = (np.arange(lo[0], hi[0], dtype=np.float32) * self.v)[:, None, None]
        yy = (np.arange(lo[1], hi[1], dtype=np.float32) * self.v)[None, :, None]
        xx = ((np.arange(lo[2], hi[2], dtype=np.float32) - self.pad) * self.v)[None, None, :]
        return sl, zz, yy, xx

    # -- profiles ------------------------------------------------------------------
    def gauss(self, d, center, sigma, amp):
        """Gaussian line profile in d, softened for the voxel size (integral preserved)."""
        s_eff = math.sqrt(sigma ** 2 + self.soft ** 2)
        return (amp * sigma / s_eff) * np.exp(-0.5 * ((d - center) / s_eff) ** 2)

    def bilayer(self, d, t, head=_V_HEAD, core=_V_CORE):
        """Bilayer potential for signed distance d (nm, > 0 outside) to the outer surface.

        Two head-group leaflets centred 0.2 t and 0.8 t deep, a light core between them.
        """
        if self.membrane is not None:
            return self._bilayer_variant(d, t, head, core)
        sig = 0.11 * t
        w = max(0.3, self.soft)
        out = self.gauss(d, -0.2 * t, sig, head) + self.gauss(d, -0.8 * t, sig, head)
        out += core * (_smooth_step(d + 0.35 * t, w) - _smooth_step(d + 0.65 * t, w))
        return out

    def _bilayer_variant(self, d, t, head, core):
        """Bilayer with the leaflet width, head-group separation, asymmetry, extra blur and
        leaflet model of ``self.membrane`` (see :class:`SimulationParams`)."""
        model, width, sep, asym, blur = self.membrane
        sig = width * t
        half = 0.5 * sep
        centres = (-(0.5 - half) * t, -(0.5 + half) * t)
        heights = (head * (1.0 + asym), head * (1.0 - asym))
        w = math.sqrt(max(0.3, self.soft) ** 2 + blur ** 2)
        out = 0.0
        for c, h in zip(centres, heights):
            if model == "gaussian":
                s_eff = math.sqrt(sig ** 2 + self.soft ** 2 + blur ** 2)
                out = out + (h * sig / s_eff) * np.exp(-0.5 * ((d - c) / s_eff) ** 2)
            else:   # "slab": flat top, same integral as the Gaussian leaflet, sharp edges
                hw = 0.5 * math.sqrt(2.0 * math.pi) * sig
                edge = math.sqrt(0.25 * self.soft ** 2 + blur ** 2) + 0.05
                out = out + h * (_smooth_step(d - c - hw, edge) - _smooth_step(d - c + hw, edge))
        core_half = max(half - 0.15, 0.05) * t
        out = out + core * (_smooth_step(d + 0.5 * t - core_half, w) - _smooth_step(d + 0.5 * t + core_half, w))
        return out

    def inside(self, d):
        """Smooth indicator of d < 0."""
        return _smooth_step(d, max(0.3, self.soft))


# --------------------------------------------------------------------------------------
# the scene: geometry of every object in nm (drawn first, rendered afterwards)
# --------------------------------------------------------------------------------------
class _Plasma:
    """Presynaptic plasma membrane: s(p) < 0 is the presynaptic cytoplasm."""

    def __init__(self, p0, n, curv_radius, az_center, az_radius, t, cleft, postsynaptic):
        self.p0 = np.asarray(p0, float)
        self.n = _unit(n)
        self.rc = float(curv_radius)
        self.az = np.asarray(az_center, float)
        self.az_radius = float(az_radius)
        self.t = float(t)
        self.cleft = float(cleft)
        self.post = bool(postsynaptic)

    def s(self, z, y, x):
        # Python floats keep float32 grids in float32 (NumPy scalars would promote)
        p0, n = self.p0.tolist(), self.n.tolist()
        dz, dy, dx = z - p0[0], y - p0[1], x - p0[2]
        along = dz * n[0] + dy * n[1] + dx * n[2]
        perp2 = dz * dz + dy * dy + dx * dx - along * along
        return along + perp2 * (0.5 / self.rc)

    def s_points(self, pts):
        pts = np.asarray(pts, float).reshape(-1, 3)
        return self.s(pts[:, 0], pts[:, 1], pts[:, 2])

    def az_weight(self, z, y, x):
        """Smooth indicator of the active-zone patch (lateral distance to the AZ centre)."""
        az, n = self.az.tolist(), self.n.tolist()
        dz, dy, dx = z - az[0], y - az[1], x - az[2]
        along = dz * n[0] + dy * n[1] + dx * n[2]
        lat = np.sqrt(np.maximum(dz * dz + dy * dy + dx * dx - along * along, 0))
        return _smooth_step(lat - self.az_radius, 8.0)


def _sphere_obstacles(center, radius):
    return [(np.asarray(center, float), float(radius))]


def _segment_obstacles(a, b, radius, step=None):
    a, b = np.asarray(a, float), np.asarray(b, float)
    length = np.linalg.norm(b - a)
    step = step or max(radius * 0.5, 1.0)
    n = max(int(math.ceil(length / step)) + 1, 2)
    return [(a + (b - a) * f, float(radius) * 1.05) for f in np.linspace(0, 1, n)]


def _ellipsoid_obstacles(center, axes, rot):
    """Chain of spheres covering an ellipsoid (semi-axes a >= b >= c along rot's columns)."""
    a, b, _ = axes
    c = np.asarray(center, float)
    u = rot[:, 0]
    if a - b < 1e-6:
        return [(c, float(a))]
    n = max(int(math.ceil((a - b) / (0.25 * b))) + 1, 2)
    return [(c + u * f, float(b) * 1.02) for f in np.linspace(-(a - b), a - b, n)]


def _bezier(p0, p1, p2, n):
    f = np.linspace(0, 1, n)[:, None]
    return (1 - f) ** 2 * p0 + 2 * (1 - f) * f * p1 + f ** 2 * p2


class _Scene:
    """Places every object (in nm) without overlaps, then renders them on a grid."""

    def __init__(self, shape, params: SimulationParams, rng: np.random.Generator):
        self.shape = tuple(shape)
        self.p = params
        self.v = params.voxel_size
        self.rng = rng
        self.size_nm = (np.asarray(shape, float) - 1) * self.v
        self.obstacles: list[tuple[np.ndarray, float]] = []   # (centre, radius) in nm
        self.objects: list[tuple[str, dict]] = []
        self.vesicles_c = np.zeros((0, 3))
        self.vesicles_r = np.zeros(0)
        self.vesicles_t = np.zeros(0)
        self.plasma: Optional[_Plasma] = None
        self.anchor = self.size_nm / 2.0       # where the vesicle cluster grows from
        self.cluster_radius = 0.0
        self.n_requested = 0
        # draws of the optional physics (lumen granules) come from their own generator
        self.rng_x = np.random.default_rng([int(params.seed), 1])
        # vesicle centres stay this many voxels further from the border (binned output)
        self.border_margin = 0.0

    # -- checks --------------------------------------------------------------------
    def _free(self, pts, radii, margin):
        """Boolean: spheres (pts, radii) clear of all obstacles by ``margin``."""
        pts = np.atleast_2d(pts)
        radii = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        ok = np.ones(len(pts), bool)
        if self.obstacles:
            oc = np.array([o[0] for o in self.obstacles])
            orad = np.array([o[1] for o in self.obstacles])
            d = np.linalg.norm(pts[:, None, :] - oc[None], axis=2)
            ok &= np.all(d >= radii[:, None] + orad[None] + margin, axis=1)
        if len(self.vesicles_c):
            d = np.linalg.norm(pts[:, None, :] - self.vesicles_c[None], axis=2)
            ok &= np.all(d >= radii[:, None] + self.vesicles_r[None] + margin, axis=1)
        return ok

    def _cytoplasm(self, pts, radii, margin):
        if self.plasma is None:
            return np.ones(len(np.atleast_2d(pts)), bool)
        return self.plasma.s_points(pts) <= -(np.asarray(radii) + margin)

    def _far_from_cluster(self, pts, radii):
        d = np.linalg.norm(np.atleast_2d(pts) - self.anchor, axis=1)
        return d - radii >= self.cluster_radius

    # -- building ------------------------------------------------------------------
    def build(self, progress):
        p = self.p
        v = self.v
        vol_nm3 = float(np.prod(self.size_nm + v))
        r_mean_vol = p.radius_mean_nm ** 3 + 3 * p.radius_mean_nm * p.radius_sd_nm ** 2
        if p.n_vesicles is None:
            n_ves = int(round(p.vesicle_fraction * vol_nm3 / (4.0 / 3.0 * math.pi * r_mean_vol)))
        else:
            n_ves = int(p.n_vesicles)
        self.n_requested = n_ves
        # the cluster occupies ~ n * vesicle volume / 0.3 packing fraction, as a half ball
        clus_vol = n_ves * 4.0 / 3.0 * math.pi * r_mean_vol / 0.3
        self.cluster_radius = (clus_vol * 3.0 / (2.0 * math.pi)) ** (1.0 / 3.0)
        self._place_plasma()
        report(progress, "phantom", 1, 10)
        self._place_distractors()
        report(progress, "phantom", 2, 10)
        self._place_vesicles(n_ves)
        self._place_connectors()

    def _place_plasma(self):
        p, rng = self.p, self.rng
        center = self.size_nm / 2.0
        self.anchor = center.copy()
        self.anchor[0] = center[0] + rng.uniform(-0.1, 0.1) * self.size_nm[0]
        if not p.plasma_membrane:
            return
        # the membrane stands roughly parallel to Z (normal in the XY plane), near one side
        axis = int(rng.integers(1, 3))
        sign = float(rng.choice([-1.0, 1.0]))
        n = np.zeros(3)
        n[axis] = sign
        other = 3 - axis
        ang = rng.uniform(-0.3, 0.3)
        n[other] = math.tan(ang)
        n[0] = rng.uniform(-0.15, 0.15)
        n = _unit(n)
        half = self.size_nm[axis] / 2.0
        margin = min(max(30.0, 0.12 * self.size_nm[axis]), 0.35 * self.size_nm[axis])
        p0 = center + n * (half - margin)
        az_c = p0.copy()
        lateral = [a for a in (1, 2) if a != axis][0]
        az_c[lateral] += rng.uniform(-0.15, 0.15) * self.size_nm[lateral]
        az_c[0] = self.anchor[0]
        t = p.membrane_thickness_nm * rng.uniform(1.05, 1.2)
        self.plasma = _Plasma(p0, n, rng.uniform(400.0, 1500.0), az_c,
                              rng.uniform(80.0, 160.0), t, rng.uniform(16.0, 24.0), p.postsynaptic)
        # the cluster grows from the active zone, just inside the membrane
        s_az = self.plasma.s_points(az_c)[0]
        self.anchor = az_c - self.plasma.n * (s_az + 4.0)
        self.objects.append(("plasma", {}))

    def _random_points(self, n, lo=None, hi=None):
        lo = np.zeros(3) if lo is None else lo
        hi = self.size_nm if hi is None else hi
        return lo + self.rng.random((n, 3)) * (hi - lo)

    def _try_place(self, sampler, tries=200):
        for _ in range(tries):
            out = sampler()
            if out is not None:
                return out
        return None

    def _place_distractors(self):
        p, rng = self.p, self.rng
        lo_all = np.array([0.0, 0.0, -0.5 * self.size_nm[2]])
        hi_all = self.size_nm * np.array([1.0, 1.0, 1.5])
        # mitochondria (large, may be cut by the border)
        for _ in range(p.n_mitochondria):
            def sample():
                axes = np.sort(rng.uniform([90, 60, 45], [220, 110, 80]))[::-1]
                rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
                c = self._random_points(1, lo_all, hi_all)[0]
                obs = _ellipsoid_obstacles(c, axes, rot)
                pts = np.array([o[0] for o in obs])
                rad = np.array([o[1] for o in obs])
                if not (np.all(self._free(pts, rad, 5.0)) and np.all(self._cytoplasm(pts, rad, 5.0))
                        and np.all(self._far_from_cluster(pts, rad))):
                    return None
                # must be at least partly visible
                if not np.any(np.all((pts > 0) & (pts < self.size_nm), axis=1)):
                    return None
                return c, axes, rot, obs
            got = self._try_place(sample)
            if got:
                c, axes, rot, obs = got
                self.obstacles += obs
                self.objects.append(("mito", dict(c=c, axes=axes, rot=rot,
                                                  ncristae=int(rng.integers(3, 8)))))
        # endosome-like compartments, optionally with intraluminal vesicles
        for _ in range(p.n_endosomes):
            def sample():
                r = rng.uniform(40.0, 75.0)
                c = self._random_points(1)[0]
                if not (self._free(c, r, 4.0)[0] and self._cytoplasm(c, r, 4.0)[0]
                        and self._far_from_cluster(c, r)[0]):
                    return None
                return c, r
            got = self._try_place(sample)
            if got:
                c, r = got
                self.obstacles += _sphere_obstacles(c, r)
                ilv = []
                for _k in range(int(rng.integers(0, 5))):
                    rr = rng.uniform(9.0, 14.0)
                    for _j in range(50):
                        cc = c + _random_unit(rng) * rng.uniform(0, r - 8 - rr)
                        if all(np.linalg.norm(cc - q) >= rr + qr + 1 for q, qr in ilv):
                            ilv.append((cc, rr))
                            break
                self.objects.append(("endosome", dict(c=c, r=r, ilv=ilv)))
        # dense-core vesicles: larger, with a dense lumen (not synaptic vesicles)
        for _ in range(p.n_dense_core):
            def sample():
                r = rng.uniform(33.0, 48.0)
                c = self._random_points(1)[0]
                if not (self._free(c, r, 3.0)[0] and self._cytoplasm(c, r, 3.0)[0]
                        and self._far_from_cluster(c, 0.6 * r)[0]):
                    return None
                return c, r
            got = self._try_place(sample)
            if got:
                c, r = got
                self.obstacles += _sphere_obstacles(c, r)
                self.objects.append(("dense_core", dict(c=c, r=r, core=r * rng.uniform(0.55, 0.75))))
        # ellipsoidal compartments
        for _ in range(p.n_ellipsoids):
            def sample():
                axes = np.sort(rng.uniform([25, 14, 10], [70, 35, 25]))[::-1]
                rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
                c = self._random_points(1)[0]
                obs = _ellipsoid_obstacles(c, axes, rot)
                pts = np.array([o[0] for o in obs])
                rad = np.array([o[1] for o in obs])
                if not (np.all(self._free(pts, rad, 3.0)) and np.all(self._cytoplasm(pts, rad, 3.0))
                        and np.all(self._far_from_cluster(pts, rad * 0.5))):
                    return None
                return c, axes, rot, obs
            got = self._try_place(sample)
            if got:
                c, axes, rot, obs = got
                self.obstacles += obs
                self.objects.append(("ellipsoid", dict(c=c, axes=axes, rot=rot)))
        # tubular compartments (curved, smooth ER-like)
        for _ in range(p.n_tubes):
            def sample():
                r = rng.uniform(9.0, 16.0)
                length = rng.uniform(120.0, 320.0)
                a = self._random_points(1)[0]
                d = _random_unit(rng)
                d[0] *= 0.4
                d = _unit(d)
                b = a + d * length
                mid = (a + b) / 2 + _random_unit(rng) * length * rng.uniform(0.05, 0.25)
                curve = _bezier(a, mid, b, max(int(length / 4), 10))
                obs = [(q, r * 1.05) for q in curve[::2]]
                pts = np.array([o[0] for o in obs])
                rad = np.array([o[1] for o in obs])
                if not (np.all(self._free(pts, rad, 3.0)) and np.all(self._cytoplasm(pts, rad, 3.0))
                        and np.all(self._far_from_cluster(pts, rad * 0.5))):
                    return None
                return curve, r, obs
            got = self._try_place(sample)
            if got:
                curve, r, obs = got
                self.obstacles += obs
                self.objects.append(("tube", dict(curve=curve, r=r)))
        # microtubules: straight, long, roughly in the XY plane
        for _ in range(p.n_microtubules):
            def sample():
                c = self._random_points(1)[0]
                d = _random_unit(rng)
                d[0] *= 0.25
                d = _unit(d)
                L = float(np.linalg.norm(self.size_nm)) * 1.5
                a, b = c - d * L / 2, c + d * L / 2
                obs = _segment_obstacles(a, b, 12.5, step=6.0)
                pts = np.array([o[0] for o in obs])
                rad = np.array([o[1] for o in obs])
                cyt = self._cytoplasm(pts, rad, 3.0)
                if not np.all(self._free(pts, rad, 3.0)):
                    return None
                # keep the part in the cytoplasm only: clip the segment where it leaves
                if not np.any(cyt):
                    return None
                idx = np.flatnonzero(cyt)
                if np.any(np.diff(idx) != 1):
                    return None
                a2, b2 = pts[idx[0]], pts[idx[-1]]
                if np.linalg.norm(b2 - a2) < 100:
                    return None
                if not np.all(self._far_from_cluster(pts[idx], rad[idx] * 0.3)):
                    return None
                return a2, b2, [obs[i] for i in idx]
            got = self._try_place(sample)
            if got:
                a, b, obs = got
                self.obstacles += obs
                self.objects.append(("microtubule", dict(a=a, b=b, phase=rng.uniform(0, 4))))
        # gold beads: 10 nm, near the top or bottom surface of the specimen slab
        self.gold = []
        for _ in range(p.n_gold):
            def sample():
                r = rng.uniform(4.6, 5.4)
                c = self._random_points(1)[0]
                zf = rng.uniform(0.0, 0.08)
                c[0] = (zf if rng.random() < 0.5 else 1 - zf) * self.size_nm[0]
                if not self._free(c, r, 2.0)[0]:
                    return None
                return c, r
            got = self._try_place(sample)
            if got:
                self.obstacles += _sphere_obstacles(*got)
                self.gold.append(got)

    def _place_vesicles(self, n_ves):
        p, rng = self.p, self.rng
        lo_margin = self.border_margin
        n_cand = 400
        jitter = p.cluster_jitter * p.radius_mean_nm * 2.0
        for i in range(n_ves):
            placed = False
            for _attempt in range(6):
                r = float(np.clip(rng.normal(p.radius_mean_nm, p.radius_sd_nm), p.radius_min_nm, p.radius_max_nm))
                rv = r / self.v
                # inside the volume (voxel coordinates): r <= c <= shape-1-r, except that
                # up to vesicle_border_cut of the diameter may leave the Y and X faces
                inset = np.array([rv, rv * (1.0 - 2.0 * p.vesicle_border_cut), rv * (1.0 - 2.0 * p.vesicle_border_cut)])
                lo = inset + lo_margin
                hi = np.asarray(self.shape, float) - 1 - inset - lo_margin
                if np.any(hi < lo):
                    continue
                cand = (lo + rng.random((n_cand, 3)) * (hi - lo)) * self.v
                pm_margin = float(rng.uniform(1.0, 4.0))
                ok = self._free(cand, r, 0.0) & self._cytoplasm(cand, r, pm_margin)
                if not np.any(ok):
                    continue
                cand = cand[ok]
                cost = np.linalg.norm(cand - self.anchor, axis=1) + rng.normal(0, jitter + 1e-9, len(cand))
                c = cand[int(np.argmin(cost))]
                # settle: slide towards the anchor until it (nearly) touches something;
                # the remaining gap is 0 for some vesicles, a few nm for most
                gap = 0.0 if rng.random() < 0.3 else float(rng.exponential(3.0))
                c = self._settle(c, r, lo * self.v, hi * self.v, gap, pm_margin)
                t = float(np.clip(rng.normal(p.membrane_thickness_nm, p.membrane_thickness_sd_nm),
                                  0.7 * p.membrane_thickness_nm, min(1.3 * p.membrane_thickness_nm, 0.6 * r)))
                self.vesicles_c = np.vstack([self.vesicles_c, c[None]])
                self.vesicles_r = np.append(self.vesicles_r, r)
                self.vesicles_t = np.append(self.vesicles_t, t)
                placed = True
                break
            if not placed:
                break
        if len(self.vesicles_r) < n_ves:
            warnings.warn(f"only {len(self.vesicles_r)} of {n_ves} vesicles fit into the volume "
                          f"{self.shape} at {self.v} nm voxels", RuntimeWarning, stacklevel=5)

    def _settle(self, c, r, lo_nm, hi_nm, gap, pm_margin):
        """Move the sphere (c, r) along the line to the anchor as far as it stays valid."""
        vec = self.anchor - c
        dist = float(np.linalg.norm(vec))
        if dist < 1e-6:
            return c
        direction = vec / dist

        def valid(lam):
            q = c + direction * lam
            return (np.all(q >= lo_nm - 1e-9) and np.all(q <= hi_nm + 1e-9)
                    and self._free(q, r, gap)[0] and self._cytoplasm(q, r, pm_margin)[0])

        if not valid(0.0):       # already closer than ``gap`` to a neighbour: keep it
            return c
        # march in steps of 2 nm, then bisect the last step
        step = 2.0
        lam = 0.0
        while lam + step <= dist and valid(lam + step):
            lam += step
        lo_l, hi_l = lam, min(lam + step, dist)
        for _ in range(12):
            mid = 0.5 * (lo_l + hi_l)
            if valid(mid):
                lo_l = mid
            else:
                hi_l = mid
        return c + direction * lo_l

    def _place_connectors(self):
        p, rng = self.p, self.rng
        self.connectors = []          # (a, b, radius) in nm
        c, r = self.vesicles_c, self.vesicles_r
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                dist = np.linalg.norm(c[j] - c[i])
                gap = dist - r[i] - r[j]
                if 2.0 <= gap <= 12.0 and rng.random() < p.connector_probability:
                    axis = (c[j] - c[i]) / dist
                    for _k in range(int(rng.integers(1, 3))):
                        off = _random_unit(rng)
                        off -= axis * off.dot(axis)
                        off = _unit(off) * rng.uniform(0, 0.45)
                        u1 = _unit(axis + off)
                        u2 = _unit(-axis + off + rng.normal(0, 0.1, 3))
                        self.connectors.append((c[i] + u1 * (r[i] - 1.0), c[j] + u2 * (r[j] - 1.0),
                                                rng.uniform(1.3, 2.0)))
        # tethers from vesicles close to the active zone to the plasma membrane
        if self.plasma is not None and len(r):
            s = self.plasma.s_points(c) + r
            az = self.plasma.az_weight(c[:, 0], c[:, 1], c[:, 2])
            for i in np.flatnonzero((s > -(self.plasma.t + 14.0)) & (az > 0.5)):
                for _k in range(int(rng.integers(1, 3))):
                    u = _unit(self.plasma.n + rng.normal(0, 0.3, 3))
                    a = c[i] + u * (r[i] - 1.0)
                    gap = -(self.plasma.s_points(a)[0]) - self.plasma.t
                    b = a + u * (gap + self.plasma.t * 0.5) / max(u.dot(self.plasma.n), 0.3)
                    self.connectors.append((a, b, rng.uniform(1.3, 2.0)))

    # -- rendering -----------------------------------------------------------------
    def render(self, grid: _Grid, progress):
        p = self.p
        v = grid.v
        pot, code = grid.pot, grid.code
        cyt_mean = 0.15 * p.crowding * _V_PROTEIN
        # plasma membrane, cleft, postsynaptic side (whole grid, vectorised over Z slabs)
        if self.plasma is not None:
            pl = self.plasma
            lo, hi = grid.extent_nm()
            for z0 in range(0, grid.pshape[0], 16):
                bx = grid.box((z0 * v, lo[1], lo[2]), (min(z0 + 15, grid.pshape[0] - 1) * v, hi[1], hi[2]))
                sl, zz, yy, xx = bx
                s_full = pl.s(zz, yy, xx)
                cs = code[sl]
                reach = pl.cleft + pl.t + 45.0 if pl.post else 5.0
                sel = (s_full > -(pl.t + 20.0)) & (s_full < reach)
                s = s_full[sel]
                zb, yb, xb = (np.broadcast_to(a, s_full.shape)[sel] for a in (zz, yy, xx))
                az = pl.az_weight(zb, yb, xb)
                sub = grid.bilayer(s, pl.t)
                # active-zone dense layer on the cytoplasmic side of the membrane
                sub += 0.55 * az * grid.inside(-(s + pl.t)) * grid.inside(s + pl.t + 12.0)
                if pl.post:
                    sub += grid.bilayer(pl.cleft - s, pl.t)
                    sub += 0.30 * az * grid.inside(s - pl.cleft) * grid.inside(-(s - pl.cleft - 8.0))  # cleft
                    sub += 0.7 * az * grid.inside(-(s - pl.cleft - pl.t)) * grid.inside(s - pl.cleft - pl.t - 35.0)
                    cs[(s_full > -1.0) & (s_full < pl.cleft + pl.t + 1.0)] = 1
                    cs[(s_full >= pl.cleft + pl.t + 1.0)] = 6
                else:
                    cs[(s_full > -pl.t - 1.0) & (s_full < 1.0)] = 1
                    cs[s_full >= 1.0] = 4
                ps = pot[sl]
                ps[sel] += sub.astype(np.float32)
        report(progress, "phantom", 3, 10)
        for kind, d in self.objects:
            if kind == "mito":
                self._render_mito(grid, **d)
            elif kind == "endosome":
                self._render_endosome(grid, **d)
            elif kind == "ellipsoid":
                self._render_ellipsoid(grid, **d)
            elif kind == "dense_core":
                self._render_dense_core(grid, **d)
            elif kind == "tube":
                self._render_tube(grid, **d)
            elif kind == "microtubule":
                self._render_microtubule(grid, **d)
        report(progress, "phantom", 4, 10)
        # vesicles
        for c, r, t in zip(self.vesicles_c.tolist(), self.vesicles_r.tolist(), self.vesicles_t.tolist()):
            c = np.asarray(c)
            bx = grid.box(c - r - 3, c + r + 3)
            if bx is None:
                continue
            c = c.tolist()
            sl, zz, yy, xx = bx
            dist = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) - r
            sub = grid.bilayer(dist, t)
            sub += (cyt_mean + p.lumen_contrast) * grid.inside(dist + t)
            pot[sl] += sub.astype(np.float32)
            code[sl][dist < 1.0] = 1
        # connectors and tethers
        for a, b, rad in self.connectors:
            self._render_rod(grid, a, b, rad, _V_PROTEIN)
        report(progress, "phantom", 5, 10)
        self._render_crowding(grid, cyt_mean)
        report(progress, "phantom", 8, 10)

    def _ellipsoid_distance(self, zz, yy, xx, c, axes, rot):
        """Approximate signed distance (nm) to an ellipsoid surface."""
        c, rot, axes = np.asarray(c).tolist(), np.asarray(rot).tolist(), np.asarray(axes).tolist()
        dz, dy, dx = zz - c[0], yy - c[1], xx - c[2]
        q = [(dz * rot[0][k] + dy * rot[1][k] + dx * rot[2][k]) / axes[k] for k in range(3)]
        s = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
        g = np.sqrt((q[0] / axes[0]) ** 2 + (q[1] / axes[1]) ** 2 + (q[2] / axes[2]) ** 2) / s + 1e-9
        return (s - 1.0) / g, q

    def _render_mito(self, grid, c, axes, rot, ncristae):
        t = self.p.membrane_thickness_nm * 1.1
        ext = axes[0] + 5
        bx = grid.box(c - ext, c + ext)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        d_full, q = self._ellipsoid_distance(zz, yy, xx, c, axes, rot)
        sel_in = d_full < 3.0
        d = d_full[sel_in]
        along = (q[0] * float(axes[0]))[sel_in]
        gap = 7.0
        inner = d + t + gap                       # inner membrane outer surface at d = -(t+gap)
        sub = grid.bilayer(d, t) + grid.bilayer(inner, t)
        matrix = grid.inside(inner + t)
        sub += 0.55 * matrix + 0.15 * grid.inside(d + t) * (1 - grid.inside(inner))
        # cristae: pairs of membranes, planes across the long axis, inside the matrix
        pos = (np.sort(self.rng.uniform(-0.75, 0.75, ncristae)) * axes[0]).tolist()
        widths = self.rng.uniform(4.0, 8.0, ncristae).tolist()
        in_matrix = inner + t + 4.0 < 3.0
        for k, x0 in enumerate(pos):
            if k and abs(x0 - pos[k - 1]) < 16:
                continue
            half = widths[k] / 2 + t
            sel = in_matrix & (np.abs(along - x0) < half + 3.0)
            if not np.any(sel):
                continue
            dd = np.abs(along[sel] - x0) - half   # lamella of two membranes
            sub[sel] += grid.bilayer(dd, t) * grid.inside(inner[sel] + t + 4.0)
        ps = grid.pot[sl]
        ps[sel_in] += sub.astype(np.float32)
        cs = grid.code[sl]
        cs[d_full < 1.0] = 1
        cs[d_full + 2 * t + gap < -1.0] = 2

    def _render_endosome(self, grid, c, r, ilv):
        t = self.p.membrane_thickness_nm * 1.05
        bx = grid.box(c - r - 3, c + r + 3)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        cf = np.asarray(c).tolist()
        d = np.sqrt((zz - cf[0]) ** 2 + (yy - cf[1]) ** 2 + (xx - cf[2]) ** 2) - r
        sub = grid.bilayer(d, t) + 0.15 * grid.inside(d + t)
        ilv = [(np.asarray(cc).tolist(), float(rr)) for cc, rr in ilv]
        for cc, rr in ilv:
            di = np.sqrt((zz - cc[0]) ** 2 + (yy - cc[1]) ** 2 + (xx - cc[2]) ** 2) - rr
            sub += grid.bilayer(di, 0.9 * t) + 0.2 * grid.inside(di + t)
        grid.pot[sl] += sub.astype(np.float32)
        cs = grid.code[sl]
        cs[d < 1.0] = 3
        cs[(d < 1.0) & (d > -t - 1.0)] = 1
        for cc, rr in ilv:
            di = np.sqrt((zz - cc[0]) ** 2 + (yy - cc[1]) ** 2 + (xx - cc[2]) ** 2) - rr
            cs[di < 1.0] = 1

    def _render_dense_core(self, grid, c, r, core):
        t = self.p.membrane_thickness_nm
        bx = grid.box(c - r - 3, c + r + 3)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        cf = np.asarray(c).tolist()
        d = np.sqrt((zz - cf[0]) ** 2 + (yy - cf[1]) ** 2 + (xx - cf[2]) ** 2) - r
        # a dense, slightly fuzzy core inside a clear halo, off-centre as in real DCVs
        sub = grid.bilayer(d, t) + 0.2 * grid.inside(d + t)
        dc = d + r - core
        sub += 1.4 * _smooth_step(dc, 1.5)
        grid.pot[sl] += sub.astype(np.float32)
        grid.code[sl][d < 1.0] = 1

    def _render_ellipsoid(self, grid, c, axes, rot):
        t = self.p.membrane_thickness_nm
        ext = axes[0] + 4
        bx = grid.box(c - ext, c + ext)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        d, _ = self._ellipsoid_distance(zz, yy, xx, c, axes, rot)
        sub = grid.bilayer(d, t) + 0.25 * grid.inside(d + t)
        grid.pot[sl] += sub.astype(np.float32)
        grid.code[sl][d < 1.0] = 1

    def _curve_distance(self, zz, yy, xx, curve):
        best = None
        for q in np.asarray(curve).tolist():
            dd = (zz - q[0]) ** 2 + (yy - q[1]) ** 2 + (xx - q[2]) ** 2
            best = dd if best is None else np.minimum(best, dd)
        return np.sqrt(best)

    def _render_tube(self, grid, curve, r):
        t = self.p.membrane_thickness_nm
        lo, hi = curve.min(0) - r - 4, curve.max(0) + r + 4
        bx = grid.box(lo, hi)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        d = self._curve_distance(zz, yy, xx, curve) - r
        sub = grid.bilayer(d, t) + 0.2 * grid.inside(d + t)
        grid.pot[sl] += sub.astype(np.float32)
        grid.code[sl][d < 1.0] = 1

    def _segment_dist(self, zz, yy, xx, a, b):
        ab = (np.asarray(b) - np.asarray(a)).tolist()
        a = np.asarray(a).tolist()
        L2 = ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2 + 1e-12
        f = ((zz - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (xx - a[2]) * ab[2]) / L2
        f = np.clip(f, 0.0, 1.0)
        return np.sqrt((zz - a[0] - f * ab[0]) ** 2 + (yy - a[1] - f * ab[1]) ** 2
                       + (xx - a[2] - f * ab[2]) ** 2), f * math.sqrt(L2)

    def _render_microtubule(self, grid, a, b, phase):
        ro, ri = 12.5, 7.5
        bx = grid.box(np.minimum(a, b) - ro - 3, np.maximum(a, b) + ro + 3)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        # the box of a long oblique line is large: render in Z slabs to bound memory
        for z0 in range(0, zz.shape[0], 16):
            zs = zz[z0:z0 + 16]
            dist, along = self._segment_dist(zs, yy, xx, a, b)
            wall = grid.inside(dist - ro) * (1 - grid.inside(dist - ri))
            sub = _V_PROTEIN * wall * (1.0 + 0.25 * np.cos(2 * math.pi * (along + phase) / 4.0))
            sub_sl = (slice(sl[0].start + z0, sl[0].start + z0 + zs.shape[0]), sl[1], sl[2])
            grid.pot[sub_sl] += sub.astype(np.float32)
            grid.code[sub_sl][dist < ro + 1.0] = 1

    def _render_rod(self, grid, a, b, rad, value):
        bx = grid.box(np.minimum(a, b) - rad - 2, np.maximum(a, b) + rad + 2)
        if bx is None:
            return
        sl, zz, yy, xx = bx
        dist, _ = self._segment_dist(zz, yy, xx, a, b)
        # thin rods: keep the integrated mass when softened by the voxel size
        s_eff = math.sqrt(rad ** 2 + grid.soft ** 2)
        sub = value * (rad / s_eff) ** 2 * grid.inside(dist - s_eff)
        grid.pot[sl] += sub.astype(np.float32)

    def _render_crowding(self, grid, cyt_mean):
        """Cytosolic proteins: random impulses blurred by Gaussians (three sizes) + ribosomes."""
        p, rng = self.p, self.rng
        v = grid.v
        shape = grid.pshape
        nvox = int(np.prod(shape))
        vol_nm3 = nvox * v ** 3
        # region multipliers: cytosol, excluded, matrix, lumen, extracellular, cleft, post
        region = np.array([1.0, 0.0, 1.6, 0.35, 0.25, 0.0, 0.9], dtype=np.float32)
        fshape = (shape[0], shape[1], sfft.next_fast_len(shape[2] + 8, real=True))
        kz = sfft.fftfreq(fshape[0])[:, None, None].astype(np.float32)
        ky = sfft.fftfreq(fshape[1])[None, :, None].astype(np.float32)
        kx = sfft.rfftfreq(fshape[2])[None, None, :].astype(np.float32)
        k2 = (kz ** 2 + ky ** 2 + kx ** 2) / (v * v)     # (1/nm)^2
        spec = None
        # (sigma nm, radius nm of an equivalent sphere, share of the protein volume)
        pops = ((1.4, 2.2, 0.5), (2.3, 3.6, 0.4), (3.6, 5.6, 0.1))
        frac = 0.15 * p.crowding
        flat_code = grid.code.reshape(-1)
        for sigma, req, share in pops:
            vol_one = 4.0 / 3.0 * math.pi * req ** 3
            n = int(frac * share * vol_nm3 / vol_one)
            if n == 0:
                continue
            idx = rng.integers(0, nvox, n)
            w = rng.lognormal(0.0, 0.35, n).astype(np.float32) * region[flat_code[idx]]
            imp = np.zeros(fshape, dtype=np.float32)
            zi, yi, xi = np.unravel_index(idx, shape)
            np.add.at(imp, (zi, yi, xi), w * (_V_PROTEIN * vol_one / v ** 3))
            s_eff2 = sigma ** 2 + grid.soft ** 2
            g = np.exp(-2.0 * math.pi ** 2 * s_eff2 * k2)
            f = sfft.rfftn(imp, workers=_N_WORKERS)
            del imp
            f *= g
            spec = f if spec is None else spec + f
        # ribosome-like dense complexes (~25 nm)
        n_rib = p.n_ribosomes
        if n_rib is None:
            n_rib = int(round(p.crowding * 6e-7 * vol_nm3))
        if n_rib:
            idx = rng.integers(0, nvox, n_rib)
            w = region[flat_code[idx]]
            imp = np.zeros(fshape, dtype=np.float32)
            zi, yi, xi = np.unravel_index(idx, shape)
            vol_one = 4.0 / 3.0 * math.pi * 11.0 ** 3
            np.add.at(imp, (zi, yi, xi), w * (_V_RNA * vol_one / v ** 3))
            # a ball of radius 11 nm with a soft edge (two lobes merge in projection)
            k = np.sqrt(k2) * 2 * math.pi * 11.0 + 1e-6
            ball = 3.0 * (np.sin(k) - k * np.cos(k)) / k ** 3
            g = ball * np.exp(-2.0 * math.pi ** 2 * (1.0 + grid.soft ** 2) * k2)
            f = sfft.rfftn(imp, workers=_N_WORKERS)
            del imp
            f *= g
            spec = f if spec is None else spec + f
        # membrane proteins on vesicle surfaces (small and V-ATPase-like bumps)
        if len(self.vesicles_r):
            pts, wts = [], []
            for c, r in zip(self.vesicles_c, self.vesicles_r):
                m = int(rng.poisson(6))
                u = _random_unit(rng, m)
                pts.append(c + u * (r + 1.5))
                wts.append(np.full(m, 0.5 * _V_PROTEIN * 4.0 / 3.0 * math.pi * 2.5 ** 3))
                if rng.random() < 0.5:
                    pts.append(c[None] + _random_unit(rng)[None] * (r + 6.0))
                    wts.append(np.full(1, _V_PROTEIN * 4.0 / 3.0 * math.pi * 5.0 ** 3))
            pts = np.concatenate(pts)
            wts = np.concatenate(wts)
            ij = np.round(pts / v).astype(int)
            ij[:, 2] += grid.pad
            ok = np.all((ij >= 0) & (ij < np.array(shape)), axis=1)
            imp = np.zeros(fshape, dtype=np.float32)
            np.add.at(imp, (ij[ok, 0], ij[ok, 1], ij[ok, 2]), (wts[ok] / v ** 3).astype(np.float32))
            g = np.exp(-2.0 * math.pi ** 2 * (2.0 ** 2 + grid.soft ** 2) * k2)
            f = sfft.rfftn(imp, workers=_N_WORKERS)
            del imp
            f *= g
            spec = f if spec is None else spec + f
        # granular content of the vesicle lumen (optional)
        if p.lumen_texture > 0 and len(self.vesicles_r):
            rx = self.rng_x
            sigma, req = 1.4, 2.2
            vol_one = 4.0 / 3.0 * math.pi * req ** 3
            pts = []
            for c, r, t in zip(self.vesicles_c, self.vesicles_r, self.vesicles_t):
                r_in = r - t - 1.5
                if r_in <= 1.0:
                    continue
                m = int(rx.poisson(p.lumen_texture * (4.0 / 3.0 * math.pi * r_in ** 3) / vol_one))
                u = _random_unit(rx, m) * (r_in * rx.random(m) ** (1.0 / 3.0))[:, None]
                pts.append(c + u)
            if pts:
                pts = np.concatenate(pts)
                ij = np.round(pts / v).astype(int)
                ij[:, 2] += grid.pad
                ok = np.all((ij >= 0) & (ij < np.array(shape)), axis=1)
                w = rx.lognormal(0.0, 0.35, int(ok.sum())).astype(np.float32) * (_V_PROTEIN * vol_one / v ** 3)
                imp = np.zeros(fshape, dtype=np.float32)
                np.add.at(imp, (ij[ok, 0], ij[ok, 1], ij[ok, 2]), w)
                g = np.exp(-2.0 * math.pi ** 2 * (sigma ** 2 + grid.soft ** 2) * k2)
                f = sfft.rfftn(imp, workers=_N_WORKERS)
                del imp
                f *= g
                spec = f if spec is None else spec + f
        if spec is not None:
            field_ = sfft.irfftn(spec, s=fshape, workers=_N_WORKERS)[:, :, :shape[2]]
            grid.pot += field_.astype(np.float32)

    # -- ground truth --------------------------------------------------------------
    def table(self) -> VesicleTable:
        return VesicleTable.from_arrays(self.vesicles_c / self.v, self.vesicles_r / self.v,
                                        voxel_size=self.v, thickness=self.vesicles_t / self.v,
                                        stage="truth")

    def region_mask(self, grid: _Grid, margin_nm: float = 45.0) -> np.ndarray:
        """1 = presynaptic cytoplasm within ``margin_nm`` of a vesicle (vesicles included)."""
        shape = self.shape
        v = self.v
        mask = np.zeros(shape, dtype=bool)
        for c, r in zip(self.vesicles_c, self.vesicles_r):
            R = r + margin_nm
            lo = np.maximum(np.floor((c - R) / v).astype(int), 0)
            hi = np.minimum(np.ceil((c + R) / v).astype(int) + 1, shape)
            if np.any(hi <= lo):
                continue
            zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            ball = (zz * v - c[0]) ** 2 + (yy * v - c[1]) ** 2 + (xx * v - c[2]) ** 2 <= R * R
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= ball
        code = grid.code[:, :, grid.pad:grid.pad + shape[2]]
        # not in other compartments or beyond the plasma membrane
        excl = (code == 2) | (code == 3) | (code == 4) | (code == 6)
        if self.plasma is not None:
            zz, yy, xx = np.ogrid[0:shape[0], 0:shape[1], 0:shape[2]]
            excl |= self.plasma.s(zz * v, yy * v, xx * v) > -self.plasma.t
        # organelle membranes / microtubules (code 1 outside vesicles)
        ves = np.zeros(shape, dtype=bool)
        for c, r in zip(self.vesicles_c, self.vesicles_r):
            lo = np.maximum(np.floor((c - r - 1) / v).astype(int), 0)
            hi = np.minimum(np.ceil((c + r + 1) / v).astype(int) + 1, shape)
            zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            ves[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= (
                (zz * v - c[0]) ** 2 + (yy * v - c[1]) ** 2 + (xx * v - c[2]) ** 2 <= (r + 1.0) ** 2)
        excl |= (code == 1) & ~ves
        return (mask & ~excl).astype(np.uint8)


# --------------------------------------------------------------------------------------
# imaging: projector, CTF, noise, weighted back-projection
# --------------------------------------------------------------------------------------
def tilt_angles(tilt_range: float = 60.0, tilt_step: float = 2.0) -> np.ndarray:
    """Tilt angles in degrees from ``-tilt_range`` to ``+tilt_range`` (inclusive) in steps."""
    n = int(math.floor(tilt_range / tilt_step + 1e-9))
    return np.arange(-n, n + 1, dtype=np.float64) * tilt_step


def _joseph_steps(u, n_step, step_centre, slope, cos_step, n_interp, interp_centre):
    """One tilt of the Joseph projector: the line through each detector bin ``u`` visits every
    voxel index ``k`` of the stepping axis at ``(u - (k - step_centre) * slope) / cos_step +
    interp_centre`` on the other axis, split linearly between the two neighbouring voxels and
    weighted by the path length ``1 / |cos_step|``.

    Yields ``(detector bin, step index, interpolation index, weight)`` arrays, once for each of
    the two neighbours, for the voxels inside the slice.
    """
    k = np.arange(n_step) - step_centre
    f = (u[None, :] - k[:, None] * slope) / cos_step + interp_centre   # (n_step, nu)
    f0 = np.floor(f).astype(np.int64)
    w1 = f - f0
    ki = np.broadcast_to(np.arange(n_step)[:, None], f.shape)
    ui = np.broadcast_to(np.arange(len(u))[None, :], f.shape)
    scale = 1.0 / abs(cos_step)
    for fi, ww in ((f0, 1 - w1), (f0 + 1, w1)):
        ok = (fi >= 0) & (fi < n_interp)
        yield ui[ok], ki[ok], fi[ok], ww[ok] * scale


def _projector(nz, nx, angles_deg):
    """Sparse Joseph projector: rows (tilt, u) <- columns (z, x) of one XZ slice.

    Detector u has ``nx`` pixels of one voxel, centred on the volume; tilt about Y, with
    u = x' cos(theta) + z' sin(theta) for centred coordinates.
    """
    zc, xc = (nz - 1) / 2.0, (nx - 1) / 2.0
    nu = nx
    uc = (nu - 1) / 2.0
    rows, cols, vals = [], [], []
    u = np.arange(nu) - uc
    for it, th in enumerate(np.deg2rad(angles_deg)):
        c, s = math.cos(th), math.sin(th)
        if abs(c) >= abs(s):  # steps along z, interpolation along x
            for ui, zi, xx, ww in _joseph_steps(u, nz, zc, s, c, nx, xc):
                rows.append(it * nu + ui)
                cols.append(zi * nx + xx)
                vals.append(ww)
        else:  # steps along x, interpolation along z
            for ui, xi, zz, ww in _joseph_steps(u, nx, xc, c, s, nz, zc):
                rows.append(it * nu + ui)
                cols.append(zz * nx + xi)
                vals.append(ww)
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    vals = np.concatenate(vals).astype(np.float32)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(angles_deg) * nu, nz * nx))


def _backprojector(nz, nx, nu, x_offset, angles_deg):
    """Sparse pixel-driven back-projector: rows (z, x) of the output <- (tilt, u).

    Output columns x are detector-grid columns ``x_offset .. x_offset + nx - 1``.
    """
    zc, uc = (nz - 1) / 2.0, (nu - 1) / 2.0
    zp = (np.arange(nz) - zc)[:, None]
    xp = (np.arange(nx) + x_offset - uc)[None, :]
    rows_base = (np.arange(nz)[:, None] * nx + np.arange(nx)[None, :])
    rows, cols, vals = [], [], []
    for it, th in enumerate(np.deg2rad(angles_deg)):
        uf = xp * math.cos(th) + zp * math.sin(th) + uc
        u0 = np.floor(uf).astype(np.int64)
        w1 = uf - u0
        for uu, ww in ((u0, 1 - w1), (u0 + 1, w1)):
            ok = (uu >= 0) & (uu < nu)
            rows.append(rows_base[ok])
            cols.append(it * nu + uu[ok])
            vals.append(ww[ok])
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    vals = np.concatenate(vals).astype(np.float32)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(nz * nx, len(angles_deg) * nu))


def ctf_1d(k, defocus_um=-8.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07, bfactor=0.0):
    """Contrast transfer function at spatial frequencies ``k`` (1/nm).

    Sign convention: dense matter (positive potential) appears dark at low frequency in
    underfocus (``defocus_um < 0``): image = 1 + 2 * (CTF * phase).

    Parameters
    ----------
    k : array_like
        Spatial frequency magnitude in 1/nm.
    defocus_um : float
        Defocus, negative = underfocus.
    voltage_kv, cs_mm, amplitude_contrast : float
    bfactor : float
        Envelope B-factor in A^2.

    Returns
    -------
    ndarray
    """
    k = np.asarray(k, dtype=np.float64)
    lam = electron_wavelength_nm(voltage_kv)
    dz = -float(defocus_um) * 1e3           # underfocus, nm (positive)
    cs = float(cs_mm) * 1e6                  # nm
    chi = math.pi * lam * dz * k ** 2 - 0.5 * math.pi * cs * lam ** 3 * k ** 4
    a = float(amplitude_contrast)
    ctf = -(math.sqrt(1 - a * a) * np.sin(chi) + a * np.cos(chi))
    return ctf * np.exp(-(bfactor / 100.0) * k ** 2 / 4.0)


def _ramp_filter(nu_pad, cutoff, falloff, window="ramp"):
    """Ram-Lak ramp (spatially derived, correct DC) times IMOD's radial Gaussian fall-off.

    ``window``: "ramp" (none), "hamming" (0.54 + 0.46 cos(2 pi f)) or "shepp-logan"
    (sinc(f)), f in cycles/pixel, applied before the cut-off.
    """
    n = np.concatenate([np.arange(0, nu_pad // 2 + 1), np.arange(-(nu_pad - nu_pad // 2 - 1), 0)])
    h = np.zeros(nu_pad)
    h[0] = 0.25
    odd = n % 2 == 1
    h[odd] = -1.0 / (math.pi * n[odd]) ** 2
    ramp = np.real(np.fft.rfft(h))
    f = np.fft.rfftfreq(nu_pad)
    if window == "hamming":
        ramp = ramp * (0.54 + 0.46 * np.cos(2 * math.pi * f))
    elif window == "shepp-logan":
        ramp = ramp * np.sinc(f)
    elif window != "ramp":
        raise ValueError(f"unknown reconstruction filter {window!r}; choose 'ramp', 'hamming' or 'shepp-logan'")
    if falloff > 0:
        ramp = np.where(f > cutoff, ramp * np.exp(-((f - cutoff) / falloff) ** 2), ramp)
    else:
        ramp = np.where(f > cutoff, 0.0, ramp)
    return ramp.astype(np.float32)


# --------------------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------------------
def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of three ints (Z, Y, X), got {shape!r}") from None
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {shape}")
    if min(shape) < 16:
        raise ValueError(f"every dimension of shape must be at least 16 voxels, got {shape}")
    if int(np.prod(shape)) > 2048 ** 3:
        raise ValueError(f"shape {shape} is too large to simulate in memory")
    return shape


def simulate_tomogram(shape: Sequence[int] = (128, 256, 256), voxel_size: Optional[float] = None,
                      seed: Optional[int] = None, params: Optional[SimulationParams] = None,
                      progress: ProgressCallback = None) -> Simulation:
    """Simulate a cryo-electron tomogram of a presynaptic terminal with its ground truth.

    Parameters
    ----------
    shape : (Z, Y, X)
        Output shape in voxels (each at least 16). Default (128, 256, 256).
    voxel_size : float, optional
        Voxel size in nm. Default: ``params.voxel_size`` (1.5 nm without ``params``).
        Given together with ``params``, it overrides ``params.voxel_size``.
    seed : int, optional
        Random seed. Default: ``params.seed`` (0 without ``params``). Given together
        with ``params``, it overrides ``params.seed``.
    params : SimulationParams, optional
        All other knobs (see :class:`SimulationParams`, :func:`random_params`).
    progress : callable, optional
        ``progress(stage, done, total)``; stages ``"phantom"``, ``"project"``,
        ``"noise"``, ``"reconstruct"``. Raise :class:`cryoves.Cancelled` in it to stop.

    Returns
    -------
    Simulation
        ``tomogram`` (float32, mean 0, std 1, membranes dark), ``labels`` (uint16,
        = ``render_labels(table, shape)``), ``mask`` (uint8, 1 = presynaptic cytoplasm
        around the cluster), ``table`` (``VesicleTable``, stage ``"truth"``, voxels),
        ``voxel_size`` (nm), ``params``.

    Raises
    ------
    ValueError
        Bad shape or parameter values (the message says which and what is allowed).

    Notes
    -----
    All vesicles lie fully inside the volume: ``r <= c <= shape - 1 - r`` in voxels on
    every axis, and no two overlap (centre distance >= sum of outer radii).
    """
    shape = _check_shape(shape)
    if params is None:
        params = SimulationParams()
    elif not isinstance(params, SimulationParams):
        raise TypeError(f"params must be a SimulationParams, got {type(params).__name__}")
    changes = {}
    if voxel_size is not None:
        changes["voxel_size"] = voxel_size
    if seed is not None:
        changes["seed"] = seed
    if changes:
        params = dataclasses.replace(params, **changes)   # validates
    else:
        params.validate()
    p = params
    v = float(p.voxel_size)
    f = int(p.recon_binning)
    if f == 1:
        return _simulate(shape, p, progress)
    # simulate on a grid f times finer, then average f^3 blocks onto the output grid
    fine = _simulate(tuple(n * f for n in shape), dataclasses.replace(p, voxel_size=v / f, recon_binning=1), progress,
                     border_margin=0.5 * (f - 1))
    nz, ny, nx = shape
    tomo = fine.tomogram.reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5), dtype=np.float64)
    tomo = (tomo - tomo.mean()) / max(float(tomo.std()), 1e-12)
    mask = (fine.mask.reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5)) >= 0.5).astype(np.uint8)
    ft = fine.table
    # fine voxel j lies at coarse coordinate (j - (f - 1) / 2) / f
    table = VesicleTable.from_arrays((ft.centers - 0.5 * (f - 1)) / f, ft.radii / f, voxel_size=v,
                                     thickness=np.asarray(ft["thickness"], float) / f, stage="truth")
    labels = render_labels(table, shape)
    return Simulation(tomogram=tomo.astype(np.float32), labels=labels, mask=mask, table=table, voxel_size=v,
                      params=p, tilt_angles=fine.tilt_angles, n_requested=fine.n_requested)


def _acquisition_order(angles: np.ndarray, scheme: str) -> np.ndarray:
    """Rank (0 = first exposed) of every tilt in the acquisition order."""
    n = len(angles)
    if scheme == "sequential":
        order = np.argsort(angles, kind="stable")
    else:   # dose-symmetric (Hagen): 0, +1, -1, -2, +2, +3, -3, ... steps
        levels = np.unique(np.round(np.abs(angles), 6))
        key = []
        for i, a in enumerate(angles):
            k = int(np.searchsorted(levels, round(abs(float(a)), 6)))
            plus_first = k % 2 == 1
            key.append((k, 0 if (a >= 0) == plus_first else 1, i))
        order = np.array([i for *_, i in sorted(key)])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _gaussian_kernel_ft(shape2d, sigma_px, real_last=True):
    """Fourier transform (rfft2 layout) of a unit-sum 2D Gaussian of ``sigma_px`` pixels."""
    k0 = sfft.fftfreq(shape2d[0])[:, None]
    k1 = (sfft.rfftfreq(shape2d[1]) if real_last else sfft.fftfreq(shape2d[1]))[None, :]
    return np.exp(-2.0 * math.pi ** 2 * sigma_px ** 2 * (k0 ** 2 + k1 ** 2)).astype(np.float32)


def _simulate(shape, p: SimulationParams, progress, border_margin: float = 0.0) -> Simulation:
    """The simulation on one grid (``p.recon_binning`` is handled by the caller)."""
    v = float(p.voxel_size)
    rng = np.random.default_rng(p.seed)
    # draws of the optional imaging physics: their own generator, so that switching one
    # on leaves the phantom and the shot noise unchanged
    rng_x = np.random.default_rng([int(p.seed), 2])
    angles = tilt_angles(p.tilt_range, p.tilt_step)
    nz, ny, nx = shape
    n_t = len(angles)

    # ---- phantom --------------------------------------------------------------------
    report(progress, "phantom", 0, 10)
    pad = int(math.ceil(0.5 * nz * math.tan(math.radians(p.tilt_range)))) + 8
    pad = min(pad, 2 * nx)
    scene = _Scene(shape, p, rng)
    scene.border_margin = float(border_margin)
    scene.build(progress)
    grid = _Grid(shape, v, pad)
    if (p.membrane_model, p.leaflet_width, p.headgroup_separation, p.bilayer_asymmetry,
            p.membrane_blur_nm) != ("gaussian", 0.11, 0.6, 0.0, 0.0):
        grid.membrane = (p.membrane_model, float(p.leaflet_width), float(p.headgroup_separation),
                         float(p.bilayer_asymmetry), float(p.membrane_blur_nm))
    scene.render(grid, progress)
    table = scene.table()
    labels = render_labels(table, shape)
    mask = scene.region_mask(grid)
    report(progress, "phantom", 9, 10)
    # relative to the mean, tapered to zero in the outer padding (laterally infinite slab)
    pot = grid.pot
    pot -= np.float32(pot[:, :, pad:pad + nx].mean())
    taper = np.ones(pot.shape[2], dtype=np.float32)
    ramp_len = max(pad // 2, 1)
    edge = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, ramp_len))
    taper[:ramp_len] = edge
    taper[len(taper) - ramp_len:] = edge[::-1]
    pot *= taper[None, None, :]
    del grid.code
    report(progress, "phantom", 10, 10)

    # ---- projection (all tilts, all Y rows at once) -----------------------------------
    report(progress, "project", 0, 2)
    npx = pot.shape[2]
    A = _projector(nz, npx, angles)
    F = np.ascontiguousarray(pot.transpose(0, 2, 1)).reshape(nz * npx, ny)
    del pot, grid.pot
    proj = (A @ F).reshape(n_t, npx, ny)                    # (tilt, u, y), V * voxel
    del F
    if p.reconstruction != "sirt":
        del A
    proj *= np.float32(v)                                   # V * nm
    # thick ice: amorphous material above and below the volume, new in every image
    thickness = nz * v
    if p.extra_ice_nm > 0:
        extra = float(p.extra_ice_nm)
        thickness = nz * v + extra
        if p.ice_crowding > 0:
            req = 3.0
            vol_one = 4.0 / 3.0 * math.pi * req ** 3
            g = _gaussian_kernel_ft((npx, ny), 2.0 / v)
            for it, th in enumerate(np.deg2rad(angles)):
                lam = 0.15 * p.ice_crowding * extra / math.cos(th) * v * v / vol_one   # blobs per pixel
                imp = rng_x.poisson(lam, (npx, ny)).astype(np.float32) * np.float32(_V_PROTEIN * vol_one / (v * v))
                imp -= np.float32(lam * _V_PROTEIN * vol_one / (v * v))
                proj[it] += sfft.irfft2(sfft.rfft2(imp, workers=_N_WORKERS) * g, s=(npx, ny),
                                        workers=_N_WORKERS).astype(np.float32)
    report(progress, "project", 1, 2)

    # ---- image formation: CTF on each projection image, gold, attenuation, noise -----
    sigma = _interaction_constant(p.voltage_kv)
    ku = sfft.fftfreq(npx)[:, None] / v
    ky = sfft.rfftfreq(ny)[None, :] / v
    kk = np.sqrt(ku ** 2 + ky ** 2)
    per_tilt = p.defocus_spread_um > 0 or p.damage_bfactor_per_dose > 0 or p.ctf_correction
    if p.defocus_spread_um > 0:
        defoci = p.defocus_um + rng_x.uniform(-0.5, 0.5, n_t) * p.defocus_spread_um
    else:
        defoci = np.full(n_t, float(p.defocus_um))
    spec = sfft.rfft2(proj, axes=(1, 2), workers=_N_WORKERS)
    if not per_tilt:
        ctf = ctf_1d(kk, p.defocus_um, p.voltage_kv, p.cs_mm, p.amplitude_contrast, p.bfactor).astype(np.float32)
        spec *= (2.0 * sigma) * ctf[None]
    else:
        # radiation damage: a B-factor growing with the dose accumulated before each image
        rank = _acquisition_order(angles, p.tilt_scheme)
        acc_dose = (rank + 0.5) * (p.dose / n_t)
        for it in range(n_t):
            b = p.bfactor + p.damage_bfactor_per_dose * acc_dose[it]
            ctf = ctf_1d(kk, defoci[it], p.voltage_kv, p.cs_mm, p.amplitude_contrast, b).astype(np.float32)
            spec[it] *= (2.0 * sigma) * ctf
    contrast = sfft.irfft2(spec, s=(npx, ny), axes=(1, 2), workers=_N_WORKERS).astype(np.float32)
    del spec, proj
    image = 1.0 + contrast                                  # (tilt, u, y)
    del contrast
    # gold beads: analytic projections (strong amplitude objects)
    if scene.gold:
        uc = (npx - 1) / 2.0
        zc = (nz - 1) / 2.0
        xc = (npx - 1) / 2.0
        uu = np.arange(npx)[:, None]
        yy = np.arange(ny)[None, :]
        for it, th in enumerate(np.deg2rad(angles)):
            c_, s_ = math.cos(th), math.sin(th)
            for c, r in scene.gold:
                cz, cy, cx = c[0] / v - zc, c[1] / v, c[2] / v + pad - xc
                u0 = cx * c_ + cz * s_ + uc
                rv = r / v
                lo_u, hi_u = max(int(u0 - rv - 2), 0), min(int(u0 + rv + 3), npx)
                lo_y, hi_y = max(int(cy - rv - 2), 0), min(int(cy + rv + 3), ny)
                if hi_u <= lo_u or hi_y <= lo_y:
                    continue
                sub_u = uu[lo_u:hi_u]
                sub_y = yy[:, lo_y:hi_y]
                rho2 = (sub_u - u0) ** 2 + (sub_y - cy) ** 2
                chord = 2.0 * np.sqrt(np.maximum(rv * rv - rho2, 0.0)) * v     # nm
                # soften the bead edge over one pixel
                chord = chord + 0.5 * v * np.clip(1.0 - (np.sqrt(rho2) - rv), 0, 1) * (chord == 0)
                image[it, lo_u:hi_u, lo_y:hi_y] *= np.exp(-_MU_GOLD * chord).astype(np.float32)
                image[it, lo_u:hi_u, lo_y:hi_y] -= (
                    2 * sigma * _V_GOLD * chord * (p.amplitude_contrast + 0.3)).astype(np.float32)
    # tilt-series alignment error: each recorded image is shifted and rotated a little
    # against the geometry the reconstruction assumes
    if p.alignment_shift_nm > 0 or p.alignment_rotation_deg > 0:
        from scipy import ndimage as ndi

        shifts = rng_x.normal(0.0, p.alignment_shift_nm / v, (n_t, 2))
        rots = np.deg2rad(rng_x.normal(0.0, p.alignment_rotation_deg, n_t))
        centre = np.array([(npx - 1) / 2.0, (ny - 1) / 2.0])
        for it in range(n_t):
            c_, s_ = math.cos(rots[it]), math.sin(rots[it])
            rot = np.array([[c_, -s_], [s_, c_]])
            offset = centre - rot @ centre - rot @ shifts[it]
            image[it] = ndi.affine_transform(image[it], rot, offset=offset, order=3, mode="nearest")
    np.maximum(image, 0.02, out=image)
    atten = np.exp(-thickness / (np.cos(np.deg2rad(angles)) * p.mean_free_path_nm)).astype(np.float32)
    report(progress, "noise", 0, 1)
    if p.snr is None:
        n0 = p.dose * p.dqe / n_t * (10.0 * v) ** 2 * atten       # electrons per pixel per tilt
        counts = rng.poisson(image * n0[:, None, None]).astype(np.float32)
        if p.noise_correlation_px > 0 or p.read_noise_e > 0:
            expected = image * n0[:, None, None].astype(np.float32)
            noise = counts - expected
            if p.noise_correlation_px > 0:
                noise = _correlate_noise(noise, p.noise_correlation_px)
            if p.read_noise_e > 0:
                noise += rng_x.standard_normal(noise.shape, dtype=np.float32) * np.float32(p.read_noise_e)
            counts = expected + noise
            del expected, noise
        proj_n = counts / n0[:, None, None].astype(np.float32) - 1.0
        del counts
    else:
        signal = image - 1.0
        central = signal[:, pad:pad + nx, :]
        noise_sd = float(np.sqrt(central.var() / p.snr))
        # thicker path at high tilt: the zero-loss signal falls, the relative noise grows
        sd = noise_sd * np.sqrt(atten[n_t // 2] / atten)
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        if p.noise_correlation_px > 0:
            noise = _correlate_noise(noise, p.noise_correlation_px)
        proj_n = signal + noise * sd[:, None, None].astype(np.float32)
        del signal, noise
    del image
    # CTF correction by phase flipping (each image with its own defocus): every band gets
    # the sign of the first lobe, so dense matter stays dark
    if p.ctf_correction:
        spec = sfft.rfft2(proj_n, axes=(1, 2), workers=_N_WORKERS)
        for it in range(n_t):
            flip = -np.sign(ctf_1d(kk, defoci[it], p.voltage_kv, p.cs_mm, p.amplitude_contrast))
            spec[it] *= np.where(flip == 0, 1.0, flip).astype(np.float32)
        proj_n = sfft.irfft2(spec, s=(npx, ny), axes=(1, 2), workers=_N_WORKERS).astype(np.float32)
        del spec
    report(progress, "noise", 1, 1)

    # ---- reconstruction -------------------------------------------------------------------
    report(progress, "reconstruct", 0, 2)
    if p.reconstruction == "sirt":
        rec = _sirt(A, np.ascontiguousarray(proj_n).reshape(n_t * npx, ny), p.sirt_iterations, progress)
        del A, proj_n
        tomo = np.ascontiguousarray(rec.reshape(nz, npx, ny)[:, pad:pad + nx, :].transpose(0, 2, 1)).astype(
            np.float32)
        del rec
    else:
        nu_pad = sfft.next_fast_len(2 * npx, real=True)
        filt = _ramp_filter(nu_pad, p.radial_cutoff, p.radial_falloff, p.recon_filter)
        spec = sfft.rfft(proj_n, n=nu_pad, axis=1, workers=_N_WORKERS)
        spec *= filt[None, :, None]
        proj_f = sfft.irfft(spec, n=nu_pad, axis=1, workers=_N_WORKERS)[:, :npx, :].astype(np.float32)
        del spec, proj_n
        B = _backprojector(nz, nx, npx, pad, angles)
        rec = B @ np.ascontiguousarray(proj_f).reshape(n_t * npx, ny)     # (z*x, y)
        del B, proj_f
        tomo = np.ascontiguousarray(rec.reshape(nz, nx, ny).transpose(0, 2, 1)).astype(np.float32)
    report(progress, "reconstruct", 1, 2)
    tomo -= tomo.mean()
    sd = float(tomo.std())
    if sd > 0:
        tomo /= sd
    if p.invert_contrast:
        tomo = -tomo
    report(progress, "reconstruct", 2, 2)
    return Simulation(tomogram=tomo, labels=labels, mask=mask, table=table, voxel_size=v,
                      params=p, tilt_angles=angles, n_requested=scene.n_requested)


def _correlate_noise(noise: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blur the noise of every image (tilt, u, y) by a Gaussian MTF, keeping its per-pixel sd."""
    shape2d = noise.shape[1:]
    g = _gaussian_kernel_ft(shape2d, sigma_px)
    # variance of white noise after the blur = sum of the squared kernel = mean of |G|^2
    full = np.concatenate([g, g[:, 1:(shape2d[1] + 1) // 2][:, ::-1]], axis=1) if shape2d[1] > 1 else g
    gain = float(np.sqrt(np.mean(full.astype(np.float64) ** 2)))
    spec = sfft.rfft2(noise, axes=(1, 2), workers=_N_WORKERS)
    spec *= g[None] / np.float32(gain)
    return sfft.irfft2(spec, s=shape2d, axes=(1, 2), workers=_N_WORKERS).astype(np.float32)


def _sirt(A: sparse.csr_matrix, proj: np.ndarray, n_iter: int, progress) -> np.ndarray:
    """SIRT: ``x += C A^T R (p - A x)`` with R, C the inverse row and column sums of A."""
    row = np.asarray(A.sum(axis=1)).ravel()
    col = np.asarray(A.sum(axis=0)).ravel()
    R = np.where(row > 1e-6, 1.0 / np.maximum(row, 1e-6), 0.0).astype(np.float32)[:, None]
    C = np.where(col > 1e-6, 1.0 / np.maximum(col, 1e-6), 0.0).astype(np.float32)[:, None]
    At = A.T.tocsr()
    x = np.zeros((A.shape[1], proj.shape[1]), dtype=np.float32)
    for k in range(n_iter):
        resid = proj - A @ x
        resid *= R
        x += C * (At @ resid)
        report(progress, "reconstruct", 0, 2)
    return x
