"""Synthetic cryo-electron tomograms of synapses, with exact ground truth.

Real data cannot be bundled, so the demo, the tests and the training of the bundled U-Net use
tomograms made here. The generator is seeded and deterministic: the same seed and parameters give
byte-identical arrays.

Phantom (built in nanometres, sampled on the output grid)
    The phantom is the electron-scattering potential relative to vitreous ice (dense = high).
    Every object is drawn from an analytic radial profile evaluated on distances, only inside the
    object's bounding box, and blurred analytically by a Gaussian of 0.45 voxel (anti-aliasing), so
    a 4.6 nm bilayer is sampled correctly at 1 nm and at 2.8 nm voxels alike.

    - a presynaptic plasma membrane: a gently curved lipid bilayer (a sphere of radius
      0.6-3 µm cutting across the volume; two dense leaflets with a lighter core), a synaptic
      cleft (~20 nm between the membranes' outer surfaces) and a postsynaptic membrane with a
      postsynaptic density (small dense blobs next to it);
    - synaptic vesicles: bilayer shells of outer radius N(20, 2.5) nm clipped to [12, 30], a few %
      dense-core vesicles (35-50 nm, dense lumen behind a light halo), clustered around a few
      centres, a few docked at the plasma membrane, some near-touching (gap >= 1 nm, never
      overlapping), some cut by the volume border (centre inside, sphere partly out), all wholly
      inside the presynaptic cytoplasm;
    - tethers (4-5 nm thick rods) between neighbouring vesicles and from docked vesicles to the
      plasma membrane, a few longer cytoskeletal filaments, crowding blobs (10-25 nm, ribosome-like)
      and a textured cytosol;
    - hard negatives that are NOT labelled: a mitochondrion (outer + inner ellipsoidal bilayers,
      lamellar cristae, dense matrix) and curved membrane fragments (spherical caps).

Image formation
    Single-axis tilt series about y (numpy (z, y, x); tilt axis = y): every x-z slice is projected
    with a Joseph line-integral projector (one sparse matrix applied to all y at once), each
    projection is filtered by the CTF (weak-phase approximation with amplitude contrast, relativistic
    wavelength, spherical aberration, a B-factor envelope), Gaussian shot noise at a per-projection
    SNR is added (the dose split equally over the tilts), and the series is reconstructed by weighted
    (ramp-filtered) back-projection. Dense matter comes out dark, with CTF fringes and the
    missing-wedge elongation along z of real cryo-ET.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Bilayer model: Gaussian leaflets (FWHM 1.7 nm) and a lighter hydrocarbon core.
_LEAFLET_SIGMA_NM = 1.7 / 2.3548
_CORE_DENSITY = 0.3
#: Anti-aliasing blur, in voxels (Gaussian sigma), applied analytically to every profile.
_AA_SIGMA_VOXELS = 0.45
#: Relative scattering potentials (vitreous ice = 0).
_DENSITY = {
    "membrane": 1.0,
    "presynaptic": 0.10,
    "cleft": 0.07,
    "postsynaptic": 0.12,
    "lumen": 0.03,
    "matrix": 0.22,
    "dense_core": 0.6,
    "tether": 0.75,
    "filament": 0.8,
    "ribosome": 0.9,
    "psd": 0.7,
}
_TEXTURE = {"presynaptic": 0.06, "cleft": 0.05, "postsynaptic": 0.07, "lumen": 0.015, "matrix": 0.08}

#: Keywords accepted by :func:`simulate_tomogram` besides ``seed``, ``shape``, ``voxel_size_nm``.
OVERRIDES = (
    "randomize",
    "snr",
    "defocus_um",
    "tilt_range_deg",
    "tilt_step_deg",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "bfactor_nm2",
    "vesicle_density",
    "n_vesicles",
    "radius_mean_nm",
    "radius_sd_nm",
    "radius_min_nm",
    "radius_max_nm",
    "dense_core_fraction",
    "n_clusters",
    "cluster_sd_nm",
    "clustered_fraction",
    "n_docked",
    "tether_probability",
    "n_filaments",
    "crowding_density",
    "with_mitochondrion",
    "n_membrane_fragments",
    "with_plasma_membrane",
    "membrane_thickness_nm",
    "cleft_width_nm",
    "membrane_curvature_radius_nm",
    "presynaptic_fraction",
)


@dataclass
class Simulation:
    """One synthetic tomogram and its ground truth (all arrays (z, y, x) on the same grid)."""

    tomogram: np.ndarray  # float32, membranes dark, zero mean, unit standard deviation
    labels: np.ndarray  # uint16, vesicle k (= vesicle_id) is the filled ball of its outer radius
    mask: np.ndarray  # uint8, 1 in the presynaptic cytoplasm
    vesicles: pd.DataFrame  # vesicle_id, x, y, z (voxels, 0-based), radius_nm, dense_core
    voxel_size_nm: float
    params: dict


# --------------------------------------------------------------------------------------------
# parameters


def _draw_params(rng: np.random.Generator, overrides: dict[str, Any]) -> dict[str, Any]:
    """Draw every random parameter (always, so that overriding one leaves the others unchanged)."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"simulate_tomogram() got unknown keyword(s) {unknown}; valid: {list(OVERRIDES)}")
    randomize = bool(overrides.get("randomize", True))
    drawn = {
        "voxel_size_nm": round(float(rng.uniform(1.0, 2.8)), 3),
        "snr": float(np.exp(rng.uniform(np.log(0.04), np.log(0.4)))),
        "defocus_um": round(float(rng.uniform(-5.0, -3.0)), 3),
        "tilt_range_deg": float(rng.integers(25, 36) * 2),  # symmetric +-50..+-70
        "bfactor_nm2": float(rng.uniform(1.0, 4.0)),
        "vesicle_density": float(rng.uniform(1500.0, 6000.0)),
        "n_clusters": int(rng.integers(1, 4)),
        "cluster_sd_nm": float(rng.uniform(50.0, 150.0)),
        "n_docked": int(rng.integers(0, 5)),
        "n_filaments": int(rng.integers(0, 6)),
        "crowding_density": float(rng.uniform(3000.0, 12000.0)),
        "with_mitochondrion": bool(rng.random() < 0.5),
        "n_membrane_fragments": int(rng.integers(0, 4)),
        "membrane_thickness_nm": float(rng.uniform(4.2, 5.0)),
        "cleft_width_nm": float(rng.uniform(17.0, 24.0)),
        "membrane_curvature_radius_nm": float(np.exp(rng.uniform(np.log(600.0), np.log(3000.0)))),
        "presynaptic_fraction": float(rng.uniform(0.55, 0.8)),
    }
    fixed = {  # used when randomize=False
        "voxel_size_nm": 2.0,
        "snr": 0.12,
        "defocus_um": -4.0,
        "tilt_range_deg": 60.0,
        "bfactor_nm2": 2.0,
        "vesicle_density": 3500.0,
        "n_clusters": 2,
        "cluster_sd_nm": 100.0,
        "n_docked": 2,
        "n_filaments": 2,
        "crowding_density": 6000.0,
        "with_mitochondrion": False,
        "n_membrane_fragments": 1,
        "membrane_thickness_nm": 4.6,
        "cleft_width_nm": 20.0,
        "membrane_curvature_radius_nm": 1000.0,
        "presynaptic_fraction": 0.7,
    }
    params: dict[str, Any] = dict(drawn if randomize else fixed)
    params.update(
        {
            "randomize": randomize,
            "tilt_step_deg": 2.0,
            "voltage_kv": 300.0,
            "cs_mm": 2.7,
            "amplitude_contrast": 0.07,
            "n_vesicles": None,
            "radius_mean_nm": 20.0,
            "radius_sd_nm": 2.5,
            "radius_min_nm": 12.0,
            "radius_max_nm": 30.0,
            "dense_core_fraction": 0.03,
            "clustered_fraction": 0.75,
            "tether_probability": 0.3,
            "with_plasma_membrane": True,
        }
    )
    params.update({k: v for k, v in overrides.items() if v is not None or k == "n_vesicles"})
    return params


def _tilt_angles(tilt_range, step: float) -> np.ndarray:
    if np.ndim(tilt_range) == 0:
        low, high = -abs(float(tilt_range)), abs(float(tilt_range))
    else:
        low, high = (float(a) for a in tilt_range)
    if not (step > 0 and -90 < low <= high < 90):
        raise ValueError(f"tilt range {tilt_range} / step {step} must lie within (-90, 90) with step > 0")
    n = int(math.floor((high - low) / step + 1e-9)) + 1
    return low + step * np.arange(n)


# --------------------------------------------------------------------------------------------
# analytic profiles


def _bilayer(rho: np.ndarray, thickness_nm: float, aa_nm: float) -> np.ndarray:
    """Lipid bilayer across signed distance ``rho`` (nm) from its mid-plane; peak ~1."""
    from scipy.special import erf

    delta = max(thickness_nm / 2 - 0.85, 0.8)  # leaflet centres; outer edge at ~thickness/2
    se = math.hypot(_LEAFLET_SIGMA_NM, aa_nm)
    a = np.float32(_LEAFLET_SIGMA_NM / se)
    k = np.float32(-0.5 / se**2)
    out = a * (np.exp(k * (rho - delta) ** 2) + np.exp(k * (rho + delta) ** 2))
    sb = np.float32(math.sqrt(2) * max(aa_nm, 0.3))
    out += np.float32(_CORE_DENSITY * 0.5) * (erf((rho + delta) / sb) - erf((rho - delta) / sb))
    return out.astype(np.float32, copy=False)


def _solid(d: np.ndarray, radius_nm: float, edge_nm: float) -> np.ndarray:
    """Smooth indicator of ``d < radius`` (1 inside), edge blurred by a Gaussian of ``edge_nm``."""
    from scipy.special import erfc

    return (0.5 * erfc((d - np.float32(radius_nm)) / np.float32(math.sqrt(2) * edge_nm))).astype(
        np.float32, copy=False
    )


class _Grid:
    """The output grid: voxel size, shape, and bounding-box helpers in nm (voxel centre = i*v)."""

    def __init__(self, shape: tuple[int, int, int], voxel_size_nm: float):
        self.shape = shape
        self.v = voxel_size_nm
        self.extent = np.array([(n - 1) * voxel_size_nm for n in shape])  # nm, z y x
        self.aa = _AA_SIGMA_VOXELS * voxel_size_nm

    def box(self, lo_nm, hi_nm):
        """Slices and broadcastable nm coordinates of the voxels within [lo, hi] (None if empty)."""
        lo = np.maximum(np.floor(np.asarray(lo_nm) / self.v).astype(int), 0)
        hi = np.minimum(np.ceil(np.asarray(hi_nm) / self.v).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        ax = [(np.arange(a, b) * self.v).astype(np.float32) for a, b in zip(lo, hi)]
        return sl, (ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :])

    def ball_box(self, centre, half_nm):
        c = np.asarray(centre, dtype=float)
        got = self.box(c - half_nm, c + half_nm)
        if got is None:
            return None
        sl, (z, y, x) = got
        cz, cy, cx = (np.float32(a) for a in c)
        return sl, (z - cz, y - cy, x - cx)

    def inside(self, p_nm) -> np.ndarray:
        p = np.atleast_2d(p_nm)
        return np.all((p >= 0) & (p <= self.extent), axis=1)

    def random_points(self, rng, n):
        return rng.uniform(0, 1, size=(n, 3)) * self.extent


def _segment_distance(z, y, x, a, b):
    """Distance from grid points to the segment a-b (nm, z y x order)."""
    ab = (b - a).astype(np.float32)
    L2 = float(ab @ ab) or 1e-9
    pz, py, px = z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2])
    t = np.clip((pz * ab[0] + py * ab[1] + px * ab[2]) / np.float32(L2), 0, 1)
    return np.sqrt((pz - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (px - t * ab[2]) ** 2)


def _point_segment_distance(p, a, b):
    p = np.atleast_2d(p)
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(p - a - t[:, None] * ab, axis=1)


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _unit(rng, n=None):
    v = rng.standard_normal((3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Ellipsoid:
    """Mitochondrion outer surface: centre, semi-axes, rotation (columns = axes in z y x)."""

    def __init__(self, centre, semi_axes, rotation):
        self.c = np.asarray(centre, float)
        self.a = np.asarray(semi_axes, float)
        self.rot = np.asarray(rotation, float)

    def local(self, p):
        return (np.atleast_2d(p) - self.c) @ self.rot

    def distance_points(self, p) -> np.ndarray:
        """Approximate signed distance (nm) of points to the surface (negative inside)."""
        q = self.local(p)
        return self._dist(q[:, 0], q[:, 1], q[:, 2])

    def _dist(self, q0, q1, q2):
        a0, a1, a2 = (float(x) for x in self.a)
        f = np.sqrt((q0 / a0) ** 2 + (q1 / a1) ** 2 + (q2 / a2) ** 2)
        g = np.sqrt((q0 / a0**2) ** 2 + (q1 / a1**2) ** 2 + (q2 / a2**2) ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = (f - 1) * f / g
        return np.where(g > 0, d, -min(a0, a1, a2))

    def distance_grid(self, z, y, x):
        r = self.rot.astype(np.float32)
        q = [z * r[0, i] + y * r[1, i] + x * r[2, i] for i in range(3)]
        return self._dist(*q).astype(np.float32), q

    def surface_points(self, rng, n=600):
        return self.c + (_unit(rng, n) * self.a) @ self.rot.T


# --------------------------------------------------------------------------------------------
# phantom


class _Phantom:
    def __init__(self, grid: _Grid, rng: np.random.Generator, p: dict[str, Any]):
        self.g, self.rng, self.p = grid, rng, p
        self.t = float(p["membrane_thickness_nm"])
        shape = grid.shape
        self.pot = np.zeros(shape, np.float32)  # objects
        self.base = np.zeros(shape, np.float32)  # compartment background
        self.tex = np.zeros(shape, np.float32)  # texture amplitude
        self.labels = np.zeros(shape, np.uint16)
        self.info: dict[str, Any] = {}

    # -- plasma membrane: s = signed distance to its mid-surface, negative presynaptic --------
    def plasma_membrane(self):
        g, rng, p = self.g, self.rng, self.p
        z, y, x = (
            (np.arange(n) * g.v).astype(np.float32).reshape([-1 if i == j else 1 for j in range(3)])
            for i, n in enumerate(g.shape)
        )
        if not p["with_plasma_membrane"]:
            self.sphere_c, self.sphere_r = None, None
            self.s = np.full(g.shape, -1e6, np.float32)
            self.info["plasma_membrane"] = None
        else:
            phi = rng.uniform(0, 2 * np.pi)
            nz = rng.uniform(-0.1, 0.1)  # near-vertical: inclined membranes fade in the wedge
            n = np.array([nz, math.cos(phi), math.sin(phi)])
            n /= np.linalg.norm(n)
            corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * g.extent
            proj = corners @ n
            m_along = proj.min() + p["presynaptic_fraction"] * (proj.max() - proj.min())
            centre = g.extent / 2
            m = centre + (m_along - centre @ n) * n
            R = float(p["membrane_curvature_radius_nm"])
            self.sphere_c, self.sphere_r = m - R * n, R
            c = self.sphere_c.astype(np.float32)
            self.s = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) - np.float32(R)
            self.info["plasma_membrane"] = {
                "curvature_centre_nm_zyx": [float(a) for a in self.sphere_c],
                "curvature_radius_nm": R,
                "normal_zyx": [float(a) for a in n],
                "thickness_nm": self.t,
                "cleft_width_nm": float(p["cleft_width_nm"]),
            }
        t, cleft = self.t, float(p["cleft_width_nm"])
        self.post_mid = t + cleft
        s = self.s
        pre, post = s < 0, s >= self.post_mid
        for name, sel in (("presynaptic", pre), ("cleft", ~pre & ~post), ("postsynaptic", post)):
            self.base[sel] = _DENSITY[name]
            self.tex[sel] = _TEXTURE[name]
        if p["with_plasma_membrane"]:
            reach = t / 2 + 4 * math.hypot(_LEAFLET_SIGMA_NM, g.aa) + 1
            for mid in (0.0, self.post_mid):
                sel = np.abs(s - np.float32(mid)) < reach
                self.pot[sel] += _bilayer(s[sel] - np.float32(mid), t, g.aa)
        self.mask = (s < -t / 2).astype(np.uint8)

    def s_points(self, pts) -> np.ndarray:
        pts = np.atleast_2d(pts)
        if self.sphere_c is None:
            return np.full(len(pts), -1e6)
        return np.linalg.norm(pts - self.sphere_c, axis=1) - self.sphere_r

    def in_cytoplasm(self, pts, margin_nm) -> np.ndarray:
        """Points at least ``margin`` inside the presynaptic cytoplasm (inner membrane surface)."""
        return self.s_points(pts) <= -self.t / 2 - margin_nm

    # -- mitochondrion ---------------------------------------------------------------------
    def mitochondrion(self):
        g, rng, p = self.g, self.rng, self.p
        self.mito = None
        if not p["with_mitochondrion"]:
            self.info["mitochondrion"] = None
            return
        probe = g.random_points(rng, 3000)
        cyto_frac = float(np.mean(self.in_cytoplasm(probe, 0)))
        for _ in range(40):
            semi = np.sort(rng.uniform(60.0, 140.0, 3))
            semi[2] *= rng.uniform(1.0, 2.0)
            e = _Ellipsoid(g.random_points(rng, 1)[0], semi, _random_rotation(rng))
            if not np.all(self.in_cytoplasm(e.surface_points(rng), 4.0)):
                continue
            inside = float(np.mean(e.distance_points(probe) < 0))
            if 0.02 < inside < 0.35 * cyto_frac:
                self.mito = e
                break
        if self.mito is None:
            self.info["mitochondrion"] = None
            return
        e, t = self.mito, self.t
        sep = t + rng.uniform(6.0, 9.0)  # outer-to-inner membrane centres
        got = g.ball_box(e.c, float(e.a.max()) + 8)
        sl, (z, y, x) = got
        d, q = e.distance_grid(z, y, x)
        pot = _bilayer(d, t, g.aa) + _bilayer(d + np.float32(sep), t, g.aa)
        inner = _solid(d, -sep, max(g.aa, 0.5))
        # lamellar cristae: pairs of bilayers across the short axes, inside the inner membrane
        n_cristae = int(rng.integers(2, 6))
        for _ in range(n_cristae):
            normal = np.array([rng.normal(0, 0.25), rng.normal(0, 0.25), 1.0])
            normal /= np.linalg.norm(normal)
            off = rng.uniform(-0.6, 0.6) * e.a[2]
            plane = q[0] * normal[0] + q[1] * normal[1] + q[2] * normal[2] - np.float32(off)
            half = (t + rng.uniform(6.0, 12.0)) / 2
            taper = _solid(d, -sep - 6.0, 2.0)
            pot += taper * (_bilayer(plane - half, t, g.aa) + _bilayer(plane + half, t, g.aa))
        self.pot[sl] += pot
        self.base[sl] = self.base[sl] * (1 - inner) + _DENSITY["matrix"] * inner
        self.tex[sl] = self.tex[sl] * (1 - inner) + _TEXTURE["matrix"] * inner
        self.info["mitochondrion"] = {
            "centre_nm_zyx": [float(a) for a in e.c],
            "semi_axes_nm": [float(a) for a in e.a],
            "rotation_zyx": [[float(a) for a in row] for row in e.rot],
            "n_cristae": n_cristae,
        }

    def mito_distance(self, pts) -> np.ndarray:
        if self.mito is None:
            return np.full(len(np.atleast_2d(pts)), np.inf)
        return self.mito.distance_points(pts)

    # -- curved membrane fragments (spherical caps) ---------------------------------------
    def fragments(self):
        g, rng, p = self.g, self.rng, self.p
        pts_all, caps = [], []
        for _ in range(int(p["n_membrane_fragments"])):
            for _try in range(30):
                radius = rng.uniform(35.0, 160.0)
                axis = _unit(rng)
                half_angle = rng.uniform(np.deg2rad(25), np.deg2rad(80))
                apex = g.random_points(rng, 1)[0]
                c = apex - radius * axis
                # sample points on the cap, ~3 nm apart
                n = int(np.clip(2 * np.pi * radius**2 * (1 - math.cos(half_angle)) / 9, 50, 6000))
                u = _unit(rng, 4 * n)
                u = u[u @ axis >= math.cos(half_angle)]
                pts = c + radius * u
                if not np.all(self.in_cytoplasm(pts, 4.0)) or np.any(self.mito_distance(pts) < 6.0):
                    continue
                if pts_all and np.min(_min_dist(pts, np.vstack(pts_all))) < 15.0:
                    continue
                pts_all.append(pts)
                caps.append((c, radius, axis, half_angle))
                break
        for c, radius, axis, half_angle in caps:
            reach = radius + 6
            got = g.ball_box(c, reach)
            if got is None:
                continue
            sl, (z, y, x) = got
            d = np.sqrt(z * z + y * y + x * x)
            with np.errstate(invalid="ignore", divide="ignore"):
                cosang = (z * axis[0] + y * axis[1] + x * axis[2]) / np.maximum(d, 1e-6)
            edge = 3.0 / radius
            taper = 0.5 * (1 + np.tanh((cosang - math.cos(half_angle)) / np.float32(edge)))
            self.pot[sl] += (taper * _bilayer(d - np.float32(radius), self.t, g.aa)).astype(np.float32)
        self.fragment_points = np.vstack(pts_all) if pts_all else np.zeros((0, 3))
        self.info["membrane_fragments"] = [
            {
                "centre_nm_zyx": [float(a) for a in c],
                "radius_nm": float(r),
                "axis_zyx": [float(b) for b in a],
                "half_angle_deg": float(np.rad2deg(h)),
            }
            for c, r, a, h in caps
        ]

    def fragment_distance(self, pts) -> np.ndarray:
        if len(self.fragment_points) == 0:
            return np.full(len(np.atleast_2d(pts)), np.inf)
        from scipy.spatial import cKDTree

        if not hasattr(self, "_frag_tree"):
            self._frag_tree = cKDTree(self.fragment_points)
        return self._frag_tree.query(np.atleast_2d(pts))[0]

    # -- vesicles ---------------------------------------------------------------------------
    def place_vesicles(self):
        g, rng, p = self.g, self.rng, self.p
        cyto_volume_um3 = float(self.mask.sum()) * g.v**3 * 1e-9
        if p["n_vesicles"] is not None:
            target = int(p["n_vesicles"])
        else:
            target = int(round(float(p["vesicle_density"]) * cyto_volume_um3))
        probe = g.random_points(rng, 4000)
        probe = probe[self.in_cytoplasm(probe, 25.0) & (self.mito_distance(probe) > 25.0)]
        clusters = probe[rng.permutation(len(probe))[: int(p["n_clusters"])]] if len(probe) else probe
        centres: list[np.ndarray] = []
        radii: list[float] = []
        dense: list[bool] = []

        def draw_radius():
            if rng.random() < p["dense_core_fraction"]:
                return float(rng.uniform(35.0, 50.0)), True
            r = rng.normal(p["radius_mean_nm"], p["radius_sd_nm"])
            return float(np.clip(r, p["radius_min_nm"], p["radius_max_nm"])), False

        def accept(c, r):
            if not g.inside(c)[0] or not self.in_cytoplasm(c, r + 1.0)[0]:
                return False
            if self.mito_distance(c)[0] < r + 3.0 or self.fragment_distance(c)[0] < r + 4.0:
                return False
            if centres:
                gap = np.linalg.norm(np.asarray(centres) - c, axis=1) - np.asarray(radii) - r
                if gap.min() < 1.0:
                    return False
            return True

        # docked vesicles at the active zone, 1.5-5 nm from the plasma membrane
        n_docked = 0
        if self.sphere_c is not None:
            for _ in range(int(p["n_docked"]) * 20):
                if n_docked >= int(p["n_docked"]) or len(centres) >= target:
                    break
                r, dc = draw_radius()
                q = g.random_points(rng, 1)[0]
                direction = (q - self.sphere_c) / np.linalg.norm(q - self.sphere_c)
                c = self.sphere_c + direction * (self.sphere_r - self.t / 2 - rng.uniform(1.5, 5.0) - r)
                if accept(c, r):
                    centres.append(c), radii.append(r), dense.append(dc)
                    n_docked += 1
        attempts = max(300, 80 * target)
        for _ in range(attempts):
            if len(centres) >= target:
                break
            r, dc = draw_radius()
            u = rng.random()
            if centres and u < 0.15:  # near-touching neighbour, gap 1-3 nm
                i = int(rng.integers(len(centres)))
                c = centres[i] + _unit(rng) * (radii[i] + r + rng.uniform(1.05, 3.0))
            elif len(clusters) and u < p["clustered_fraction"]:
                c = clusters[int(rng.integers(len(clusters)))] + rng.normal(0, p["cluster_sd_nm"], 3)
            else:
                c = g.random_points(rng, 1)[0]
            if accept(c, r):
                centres.append(c), radii.append(r), dense.append(dc)
        self.centres = np.asarray(centres).reshape(-1, 3)
        self.radii = np.asarray(radii, float)
        self.dense = np.asarray(dense, bool)
        self.n_docked = n_docked
        self.info.update(
            {"n_vesicles_target": target, "n_vesicles_placed": len(centres), "n_docked_placed": n_docked}
        )

    def render_vesicles(self):
        g, rng, t = self.g, self.rng, self.t
        edge = max(g.aa, 0.5)
        reach_extra = 4 * math.hypot(_LEAFLET_SIGMA_NM, g.aa) + 1
        for k, (c, r, dc) in enumerate(zip(self.centres, self.radii, self.dense), start=1):
            got = g.ball_box(c, r + reach_extra)
            sl, (z, y, x) = got
            d = np.sqrt(z * z + y * y + x * x)
            mid = r - t / 2
            amp = np.float32(rng.uniform(0.85, 1.1))
            pot = amp * _bilayer(d - np.float32(mid), t, g.aa)
            if dc:
                pot += _DENSITY["dense_core"] * rng.uniform(0.8, 1.2) * _solid(
                    d, mid - t / 2 - rng.uniform(2.5, 5.0), max(g.aa, 1.0)
                )
            self.pot[sl] += pot
            fill = _solid(d, mid, edge)
            self.base[sl] = self.base[sl] * (1 - fill) + _DENSITY["lumen"] * fill
            self.tex[sl] = self.tex[sl] * (1 - fill) + _TEXTURE["lumen"] * fill
            lab = self.labels[sl]
            lab[d <= r] = k

    # -- tethers and filaments --------------------------------------------------------------
    def rod(self, a, b, radius_nm, density, clip_to_cytoplasm=False):
        g = self.g
        reach = radius_nm + 3 * max(g.aa, 0.6) + 1
        got = g.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if got is None:
            return
        sl, (z, y, x) = got
        d = _segment_distance(z, y, x, a, b)
        pot = np.float32(density) * _solid(d, radius_nm, max(g.aa, 0.6))
        if clip_to_cytoplasm:
            pot *= np.clip((-self.s[sl] - self.t / 2 - 1.0) / 2.0, 0, 1)
        self.pot[sl] += pot

    def tethers_and_filaments(self):
        g, rng, p = self.g, self.rng, self.p
        from scipy.spatial import cKDTree

        n_tethers = 0
        c, r = self.centres, self.radii
        if len(c) > 1:
            pairs = sorted(cKDTree(c).query_pairs(2 * float(r.max()) + 20.0))
            for i, j in pairs:
                gap = np.linalg.norm(c[j] - c[i]) - r[i] - r[j]
                if 2.0 <= gap <= 20.0 and rng.random() < p["tether_probability"]:
                    u = (c[j] - c[i]) / np.linalg.norm(c[j] - c[i])
                    jitter = 0.3 * _unit(rng)
                    ui = u + jitter - (jitter @ u) * u
                    uj = -u + jitter - (jitter @ u) * u
                    a = c[i] + r[i] * ui / np.linalg.norm(ui)
                    b = c[j] + r[j] * uj / np.linalg.norm(uj)
                    self.rod(a, b, rng.uniform(2.0, 2.5), _DENSITY["tether"])
                    n_tethers += 1
        # docked vesicles to the plasma membrane
        if self.sphere_c is not None and len(c):
            s_c = self.s_points(c)
            for i in np.flatnonzero(s_c + r > -self.t / 2 - 8.0):
                if rng.random() < 0.7:
                    u = (c[i] - self.sphere_c) / np.linalg.norm(c[i] - self.sphere_c)
                    u2 = u + 0.4 * _unit(rng)
                    u2 /= np.linalg.norm(u2)
                    a = c[i] + r[i] * u2
                    b = self.sphere_c + u2 * (self.sphere_r - self.t / 2 + 0.5)
                    if np.linalg.norm(b - a) < 12.0:
                        self.rod(a, b, rng.uniform(2.0, 2.5), _DENSITY["tether"])
                        n_tethers += 1
        n_filaments = 0
        for _ in range(int(p["n_filaments"])):
            for _try in range(30):
                length = rng.uniform(60.0, 250.0)
                mid = g.random_points(rng, 1)[0]
                u = _unit(rng)
                a, b = mid - u * length / 2, mid + u * length / 2
                radius = rng.uniform(2.5, 3.5)
                samples = a + np.linspace(0, 1, 40)[:, None] * (b - a)
                if len(c) and np.any(_point_segment_distance(c, a, b) < r + radius + 2.0):
                    continue
                if np.any(self.mito_distance(samples) < radius + 3) or np.any(
                    self.fragment_distance(samples) < radius + 3
                ):
                    continue
                if not np.all(self.in_cytoplasm(samples, -200.0)):
                    continue
                self.rod(a, b, radius, _DENSITY["filament"], clip_to_cytoplasm=True)
                n_filaments += 1
                break
        self.info.update({"n_tethers": n_tethers, "n_filaments_placed": n_filaments})

    # -- crowding: ribosome-like blobs and the postsynaptic density ---------------------------
    def blobs(self):
        g, rng, p = self.g, self.rng, self.p
        box_um3 = float(np.prod(g.extent + g.v)) * 1e-9
        n = int(rng.poisson(float(p["crowding_density"]) * box_um3))
        pts = g.random_points(rng, n)
        rad = rng.uniform(5.0, 12.5, n)
        s = self.s_points(pts)
        cyto = (s < -self.t / 2 - rad - 1) | (s > self.post_mid + self.t / 2 + rad + 1)
        ok = cyto & (self.mito_distance(pts) > rad + 3) & (self.fragment_distance(pts) > rad + 3)
        if len(self.centres):
            dist = np.linalg.norm(pts[:, None, :] - self.centres[None], axis=2)
            ok &= np.all(dist - self.radii[None] - rad[:, None] > 1.0, axis=1)
        pts, rad = pts[ok], rad[ok]
        n_psd = 0
        if self.sphere_c is not None:
            m = int(rng.poisson(60000.0 * box_um3))
            q = g.random_points(rng, m)
            sq = self.s_points(q)
            lo = self.post_mid + self.t / 2 + 1
            q = q[(sq > lo + 3) & (sq < lo + rng.uniform(25.0, 45.0))]
            n_psd = len(q)
            for c in q:
                self._blob(c, rng.uniform(3.0, 6.0), _DENSITY["psd"] * rng.uniform(0.7, 1.2))
        for c, r in zip(pts, rad):
            amp = _DENSITY["ribosome"] * rng.uniform(0.8, 1.15)
            self._blob(c, r, amp)
            # a second, smaller subunit
            self._blob(c + _unit(rng) * 0.6 * r, 0.7 * r, amp)
        self.info.update({"n_crowding_blobs": int(len(pts)), "n_psd_blobs": n_psd})

    def _blob(self, c, r, amp):
        g = self.g
        edge = math.hypot(g.aa, 0.8)
        got = g.ball_box(c, r + 3 * edge + 1)
        if got is None:
            return
        sl, (z, y, x) = got
        d = np.sqrt(z * z + y * y + x * x)
        self.pot[sl] += np.float32(amp) * _solid(d, r, edge)

    def texture(self) -> np.ndarray:
        from scipy.ndimage import gaussian_filter

        g = self.g
        noise = self.rng.standard_normal(g.shape, dtype=np.float32)
        field = gaussian_filter(noise, sigma=max(2.0 / g.v, 0.6), mode="wrap", truncate=3.0)
        field /= max(float(field.std()), 1e-6)
        return self.pot + self.base + self.tex * field


def _min_dist(a, b):
    from scipy.spatial import cKDTree

    return cKDTree(b).query(a)[0]


def build_phantom(grid: _Grid, rng: np.random.Generator, params: dict[str, Any]):
    """Return potential, labels, mask, vesicle table (nm) and geometry info."""
    ph = _Phantom(grid, rng, params)
    ph.plasma_membrane()
    ph.mitochondrion()
    ph.fragments()
    ph.place_vesicles()
    ph.render_vesicles()
    ph.tethers_and_filaments()
    ph.blobs()
    potential = ph.texture()
    return potential, ph.labels, ph.mask, ph.centres, ph.radii, ph.dense, ph.info


# --------------------------------------------------------------------------------------------
# image formation


def electron_wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength (nm) at an acceleration voltage (kV); 300 kV -> 1.97 pm."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    V = voltage_kv * 1e3
    return h / math.sqrt(2 * m0 * e * V * (1 + e * V / (2 * m0 * c**2))) * 1e9


def ctf(
    k_nm: np.ndarray,
    defocus_um: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor_nm2: float = 0.0,
) -> np.ndarray:
    """Contrast transfer at spatial frequency ``k`` (1/nm); ``defocus_um`` < 0 is underfocus.

    Sign convention: image contrast = CTF * projected potential, so CTF(0) = -amplitude_contrast
    and dense matter is dark in underfocus.
    """
    lam = electron_wavelength_nm(voltage_kv)
    dz = -defocus_um * 1e3  # underfocus positive, nm
    cs = cs_mm * 1e6
    k2 = np.asarray(k_nm, float) ** 2
    gamma = np.pi * lam * dz * k2 - 0.5 * np.pi * cs * lam**3 * k2**2
    w = amplitude_contrast
    out = -(math.sqrt(1 - w * w) * np.sin(gamma) + w * np.cos(gamma))
    return out * np.exp(-bfactor_nm2 * k2 / 4)


def _interp_entries(pos, n):
    """Linear-interpolation neighbours and weights of fractional positions on 0..n-1."""
    i0 = np.floor(pos).astype(np.int64)
    f = pos - i0
    out = []
    for idx, w in ((i0, 1 - f), (i0 + 1, f)):
        out.append((idx, w, (idx >= 0) & (idx < n) & (w > 0)))
    return out


def _projector(nz, nx, nu, angles):
    """Sparse (n_angles*nu, nz*nx) Joseph line-integral projector in an x-z slice (voxel units)."""
    from scipy import sparse

    zc, xc, uc = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    u = np.arange(nu) - uc
    rows, cols, vals = [], [], []
    for k, th in enumerate(angles):
        c, s = math.cos(th), math.sin(th)
        if abs(c) >= abs(s):  # step through z layers, interpolate along x
            z = np.arange(nz)
            pos = xc + (u[None, :] - (z[:, None] - zc) * s) / c  # (nz, nu)
            layer, w0 = z[:, None], 1 / abs(c)
            for idx, w, ok in _interp_entries(pos, nx):
                zz = np.broadcast_to(layer, pos.shape)
                rows.append((k * nu + np.broadcast_to(np.arange(nu), pos.shape))[ok])
                cols.append((zz * nx + idx)[ok])
                vals.append((w * w0)[ok])
        else:  # step through x columns, interpolate along z
            x = np.arange(nx)
            pos = zc + (u[None, :] - (x[:, None] - xc) * c) / s  # (nx, nu)
            col, w0 = x[:, None], 1 / abs(s)
            for idx, w, ok in _interp_entries(pos, nz):
                xx = np.broadcast_to(col, pos.shape)
                rows.append((k * nu + np.broadcast_to(np.arange(nu), pos.shape))[ok])
                cols.append((idx * nx + xx)[ok])
                vals.append((w * w0)[ok])
    mat = sparse.coo_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(angles) * nu, nz * nx),
    )
    return mat.tocsr()


def _backprojector(nz, nx, nu, angles):
    """Sparse (nz*nx, n_angles*nu) voxel-driven linear-interpolation back-projector."""
    from scipy import sparse

    zc, xc, uc = (nz - 1) / 2, (nx - 1) / 2, (nu - 1) / 2
    zz, xx = np.meshgrid(np.arange(nz) - zc, np.arange(nx) - xc, indexing="ij")
    vox = np.arange(nz * nx)
    rows, cols, vals = [], [], []
    for k, th in enumerate(angles):
        pos = (uc + xx * math.cos(th) + zz * math.sin(th)).ravel()
        for idx, w, ok in _interp_entries(pos, nu):
            rows.append(vox[ok])
            cols.append(k * nu + idx[ok])
            vals.append(w[ok])
    mat = sparse.coo_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(nz * nx, len(angles) * nu),
    )
    return mat.tocsr()


def _ramp_filter(npad: int, cutoff: float = 0.35, falloff: float = 0.05) -> np.ndarray:
    """Ram-Lak ramp (exact discrete form, finite DC) with a Gaussian roll-off past ``cutoff``."""
    f = np.zeros(npad)
    f[0] = 0.25
    odd = np.arange(1, npad, 2)
    n = np.minimum(odd, npad - odd)
    f[odd] = -1.0 / (np.pi * n) ** 2
    ramp = 2 * np.real(np.fft.rfft(f))
    freq = np.fft.rfftfreq(npad)
    roll = np.where(freq <= cutoff, 1.0, np.exp(-((freq - cutoff) ** 2) / (2 * falloff**2)))
    return (ramp * roll).astype(np.float32)


def tilt_series_wbp(
    potential: np.ndarray,
    voxel_size_nm: float,
    angles_deg: np.ndarray,
    rng: np.random.Generator,
    snr: float,
    defocus_um: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor_nm2: float = 0.0,
) -> np.ndarray:
    """Project ``potential`` over a tilt series about y, apply CTF and noise, reconstruct by WBP.

    Returns the reconstruction (z, y, x), float32, zero mean and unit standard deviation.
    ``snr`` is the signal-to-noise variance ratio of each projection image.
    """
    from scipy import fft as sfft

    nz, ny, nx = potential.shape
    th = np.deg2rad(np.asarray(angles_deg, float))
    extent = np.max((nx - 1) * np.abs(np.cos(th)) + (nz - 1) * np.abs(np.sin(th))) + 1
    nu = max(nx, int(math.ceil(extent)) + 2)
    vol = np.ascontiguousarray(potential.transpose(0, 2, 1), dtype=np.float32).reshape(nz * nx, ny)
    proj = (_projector(nz, nx, nu, th) @ vol).reshape(len(th), nu, ny)
    proj *= np.float32(voxel_size_nm)  # line integrals in nm
    # CTF on each projection image (axes u, y)
    ku = sfft.fftfreq(nu, d=voxel_size_nm)
    ky = sfft.rfftfreq(ny, d=voxel_size_nm)
    k = np.sqrt(ku[:, None] ** 2 + ky[None, :] ** 2)
    transfer = ctf(k, defocus_um, voltage_kv, cs_mm, amplitude_contrast, bfactor_nm2).astype(np.float32)
    spec = sfft.rfft2(proj, axes=(1, 2), workers=1)
    spec *= transfer
    img = sfft.irfft2(spec, s=(nu, ny), axes=(1, 2), workers=1)
    del spec, proj
    # shot noise, equal dose per tilt
    sigma = float(img.std()) / math.sqrt(snr)
    img += np.float32(sigma) * rng.standard_normal(img.shape, dtype=np.float32)
    # weighted back-projection
    npad = sfft.next_fast_len(2 * nu)
    spec = sfft.rfft(img, n=npad, axis=1, workers=1)
    spec *= _ramp_filter(npad)[None, :, None]
    filt = sfft.irfft(spec, n=npad, axis=1, workers=1)[:, :nu, :]
    del spec, img
    filt = np.ascontiguousarray(filt, dtype=np.float32).reshape(len(th) * nu, ny)
    rec = (_backprojector(nz, nx, nu, th) @ filt).reshape(nz, nx, ny).transpose(0, 2, 1)
    rec = np.ascontiguousarray(rec, dtype=np.float32)
    rec -= np.float32(rec.mean())
    rec /= np.float32(max(float(rec.std()), 1e-12))
    return rec


# --------------------------------------------------------------------------------------------
# public API


def simulate_tomogram(
    seed: int,
    shape: tuple[int, int, int] = (64, 256, 256),
    voxel_size_nm: float | None = None,
    **overrides,
) -> Simulation:
    """Simulate one cryo-ET tomogram of a synapse with its vesicle ground truth.

    Args:
        seed: random seed; the same seed, shape and keywords give byte-identical outputs.
        shape: (z, y, x) voxels of the tomogram.
        voxel_size_nm: voxel size; None draws it uniformly from 1.0-2.8 nm (2.0 with
            ``randomize=False``).

    Keywords (each None or absent = drawn at random from the range given; the drawn value is
    recorded in ``params``; with ``randomize=False`` the value in brackets is used instead):
        randomize: draw the unspecified parameters at random (default True).
        snr: signal-to-noise variance ratio of each projection image, log-uniform 0.04-0.4 [0.12].
        defocus_um: defocus in µm, negative = underfocus, uniform -5..-3 [-4].
        tilt_range_deg: max tilt (symmetric +-value) or a (min, max) pair in degrees; even
            integers 50-70 [60].
        tilt_step_deg: tilt increment in degrees (2).
        voltage_kv, cs_mm, amplitude_contrast: microscope (300 kV, 2.7 mm, 0.07).
        bfactor_nm2: B-factor of the CTF envelope exp(-B k^2 / 4), nm², uniform 1-4 [2].
        vesicle_density: synaptic vesicles per µm³ of presynaptic cytoplasm within the volume,
            uniform 1500-6000 [3500].
        n_vesicles: number of vesicles to place instead of ``vesicle_density`` (fewer if they do
            not fit; the count placed is ``params["n_vesicles_placed"]``).
        radius_mean_nm, radius_sd_nm, radius_min_nm, radius_max_nm: outer radius distribution of
            clear vesicles (20, 2.5, 12, 30).
        dense_core_fraction: probability that a vesicle is a 35-50 nm dense-core vesicle (0.03).
        n_clusters: vesicle cluster centres, 1-3 [2]; cluster_sd_nm: their Gaussian spread,
            50-150 nm [100]; clustered_fraction: share of placements drawn from clusters (0.75).
        n_docked: vesicles docked 1.5-5 nm from the plasma membrane, 0-4 [2].
        tether_probability: chance that a neighbouring pair 2-20 nm apart is tethered (0.3).
        n_filaments: long cytoskeletal filaments, 0-5 [2].
        crowding_density: ribosome-like blobs per µm³ of volume, 3000-12000 [6000].
        with_mitochondrion: add a mitochondrion if one fits, probability 0.5 [False].
        n_membrane_fragments: curved membrane fragments (unlabelled hard negatives), 0-3 [1].
        with_plasma_membrane: draw the synapse (plasma membrane, cleft, postsynaptic side); if
            False the whole volume is presynaptic cytoplasm (True).
        membrane_thickness_nm: bilayer thickness, 4.2-5.0 [4.6].
        cleft_width_nm: synaptic cleft between the membranes' outer surfaces, 17-24 [20].
        membrane_curvature_radius_nm: radius of curvature of the plasma membrane,
            log-uniform 600-3000 [1000].
        presynaptic_fraction: where the plasma membrane cuts the volume, as a fraction of its
            extent along the membrane normal, 0.55-0.8 [0.7].
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8 voxels, got {shape}")
    seq = np.random.SeedSequence(int(seed))
    rng_params, rng_phantom, rng_noise = (np.random.default_rng(s) for s in seq.spawn(3))
    params = _draw_params(rng_params, overrides)
    if voxel_size_nm is not None:
        params["voxel_size_nm"] = float(voxel_size_nm)
    v = float(params["voxel_size_nm"])
    if not 0.1 <= v <= 50:
        raise ValueError(f"voxel_size_nm must be 0.1-50 nm, got {v}")
    if not params["snr"] > 0:
        raise ValueError(f"snr must be > 0, got {params['snr']}")
    angles = _tilt_angles(params["tilt_range_deg"], float(params["tilt_step_deg"]))
    grid = _Grid(shape, v)
    potential, labels, mask, centres, radii, dense, info = build_phantom(grid, rng_phantom, params)
    tomogram = tilt_series_wbp(
        potential,
        v,
        angles,
        rng_noise,
        snr=float(params["snr"]),
        defocus_um=float(params["defocus_um"]),
        voltage_kv=float(params["voltage_kv"]),
        cs_mm=float(params["cs_mm"]),
        amplitude_contrast=float(params["amplitude_contrast"]),
        bfactor_nm2=float(params["bfactor_nm2"]),
    )
    vesicles = pd.DataFrame(
        {
            "vesicle_id": np.arange(1, len(radii) + 1, dtype=np.int64),
            "x": centres[:, 2] / v,
            "y": centres[:, 1] / v,
            "z": centres[:, 0] / v,
            "radius_nm": radii.astype(float),
            "dense_core": dense.astype(bool),
        }
    )
    params.update(
        {
            "generator": "vesicleflow.simulate",
            "seed": int(seed),
            "shape_zyx": list(shape),
            "voxel_size_nm": v,
            "tilt_range_deg": (
                float(params["tilt_range_deg"])
                if np.ndim(params["tilt_range_deg"]) == 0
                else [float(a) for a in params["tilt_range_deg"]]
            ),
            "tilt_angles_deg": [round(float(a), 6) for a in angles],
            "n_dense_core": int(dense.sum()),
            "wavelength_nm": electron_wavelength_nm(float(params["voltage_kv"])),
            "presynaptic_voxel_fraction": float(mask.mean()),
            **info,
        }
    )
    return Simulation(
        tomogram=tomogram,
        labels=labels,
        mask=mask,
        vesicles=vesicles,
        voxel_size_nm=v,
        params=_jsonable(params),
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def write_simulation(sim: Simulation, tomogram_dir: Path, truth_dir: Path, name: str) -> None:
    """Write a simulation: the tomogram and its mask under ``tomogram_dir``, the truth under ``truth_dir``.

    Files: ``tomogram_dir/<name>.mrc`` (float32), ``tomogram_dir/<name>_mask.mrc`` (uint8),
    ``truth_dir/<name>_labels.mrc`` (uint16), ``truth_dir/<name>_vesicles.csv`` (vesicle_id,
    x, y, z [voxels], radius_nm, dense_core, x_nm, y_nm, z_nm) and ``truth_dir/<name>_params.json``.
    Every MRC carries the voxel size in Å; every file is written atomically.
    """
    from vesicleflow.io import write_json, write_mrc, write_table

    tomogram_dir, truth_dir = Path(tomogram_dir), Path(truth_dir)
    vs_a = float(sim.voxel_size_nm) * 10.0
    write_mrc(tomogram_dir / f"{name}.mrc", sim.tomogram.astype(np.float32, copy=False), vs_a)
    write_mrc(tomogram_dir / f"{name}_mask.mrc", sim.mask.astype(np.uint8, copy=False), vs_a)
    write_mrc(truth_dir / f"{name}_labels.mrc", sim.labels.astype(np.uint16, copy=False), vs_a)
    table = sim.vesicles.copy()
    for axis in "xyz":
        table[f"{axis}_nm"] = table[axis] * sim.voxel_size_nm
    write_table(truth_dir / f"{name}_vesicles.csv", table)
    write_json(truth_dir / f"{name}_params.json", sim.params)


def simulate_tree(
    out_dir: Path,
    n_datasets: int = 2,
    n_tomograms: int = 2,
    shape=(64, 256, 256),
    seed: int = 0,
    voxel_sizes_nm: list[float] | None = None,
    **overrides,
) -> Path:
    """Write a tree of synthetic datasets; returns ``out_dir``.

    Layout: ``out_dir/tomograms/<dataset>/<tomo>.mrc`` (+ ``_mask.mrc``) and
    ``out_dir/truth/<dataset>/<tomo>_labels.mrc``, ``_vesicles.csv``, ``_params.json``, with
    datasets ``dataset_a``, ``dataset_b``... and tomograms ``tomo_01``, ``tomo_02``...
    All tomograms of a dataset share one voxel size (``voxel_sizes_nm[i]``, or drawn from
    1.0-2.8 nm per dataset); each tomogram has its own seed derived from ``seed``.
    ``overrides`` go to :func:`simulate_tomogram`.
    """
    out_dir = Path(out_dir)
    if voxel_sizes_nm is not None and len(voxel_sizes_nm) < n_datasets:
        raise ValueError(f"voxel_sizes_nm has {len(voxel_sizes_nm)} values for {n_datasets} datasets")
    for d in range(n_datasets):
        dataset = _dataset_name(d)
        if voxel_sizes_nm is not None:
            vs = float(voxel_sizes_nm[d])
        else:
            vs = round(float(np.random.default_rng([int(seed), d]).uniform(1.0, 2.8)), 3)
        for t in range(n_tomograms):
            tomo_seed = int(np.random.SeedSequence([int(seed), d, t]).generate_state(1)[0])
            sim = simulate_tomogram(tomo_seed, shape=shape, voxel_size_nm=vs, **overrides)
            sim.params.update({"dataset": dataset, "tree_seed": int(seed)})
            write_simulation(
                sim, out_dir / "tomograms" / dataset, out_dir / "truth" / dataset, f"tomo_{t + 1:02d}"
            )
    return out_dir


#: (share, overrides drawn from a generator) of the regimes a varied training set mixes: the suite's
#: hard cases (crowded, low SNR, vesicle-free) must be seen in training, with other seeds.
TRAINING_REGIMES: dict[str, tuple[float, Any]] = {
    "standard": (0.5, lambda rng: {}),
    "crowded": (0.2, lambda rng: {"vesicle_density": float(rng.uniform(6000.0, 11000.0)), "n_clusters": 1,
                                  "cluster_sd_nm": float(rng.uniform(50.0, 90.0)), "clustered_fraction": 1.0}),
    "low_snr": (0.2, lambda rng: {"snr": float(np.exp(rng.uniform(np.log(0.025), np.log(0.06))))}),
    "empty": (0.1, lambda rng: {"n_vesicles": 0}),
}


def simulate_training_set(out_dir: Path, n_tomograms: int, shape=(96, 192, 192), seed: int = 0) -> Path:
    """Write a varied training set: one dataset per regime of :data:`TRAINING_REGIMES`.

    Each tomogram draws its own voxel size (1.0-2.8 nm) and regime, so one set spans fine and
    coarse sampling, crowding, low SNR and vesicle-free cytoplasm. Same layout as
    :func:`simulate_tree`; tomogram seeds are ``seed * 10_000 + i``.
    """
    out_dir = Path(out_dir)
    names = list(TRAINING_REGIMES)
    shares = np.array([TRAINING_REGIMES[n][0] for n in names])
    for i in range(n_tomograms):
        tomo_seed = int(seed) * 10_000 + i
        rng = np.random.default_rng([tomo_seed, 1])
        regime = names[int(rng.choice(len(names), p=shares / shares.sum()))]
        voxel_nm = round(float(rng.uniform(1.0, 2.8)), 3)
        sim = simulate_tomogram(tomo_seed, shape=shape, voxel_size_nm=voxel_nm, **TRAINING_REGIMES[regime][1](rng))
        sim.params.update({"dataset": regime, "training_regime": regime})
        write_simulation(sim, out_dir / "tomograms" / regime, out_dir / "truth" / regime, f"tomo_{i + 1:03d}")
    return out_dir


def _dataset_name(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(ord("a") + r) + letters
    return f"dataset_{letters}"
