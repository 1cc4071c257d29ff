"""The scanner model of the realistic synthetic LUNA16 profile: partial volume, PSF, noise.

A CT slice is not a point sample of the patient: its value is the average of the tissue across
the slice thickness (the partial-volume effect that turns a 3 mm nodule on a 2.5 mm slice into
a faint smudge), smeared in-plane by the reconstruction's point-spread function, with
correlated noise on top. The realistic profile draws the anatomy on a grid `k` times finer in z
than the native slices and then:

1. averages each run of `k` fine slices into one native slice (a box slice profile; the slice
   thickness equals the spacing, as in contiguous reconstructions);
2. blurs with a Gaussian PSF of `psf_sigma_mm` in-plane and a little along z;
3. adds noise that is Gaussian, correlated over a fraction of a millimetre in-plane (CT's noise
   power spectrum peaks at mid frequencies, so its grain is larger than a voxel), scaled to a
   target standard deviation in HU.

Gaussian filtering is SimpleITK's `DiscreteGaussian` in physical units, which stays accurate
for kernels narrower than a voxel (the recursive Gaussian does not).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk


def fine_factor(slice_mm: float, fine_mm: float) -> int:
    """Fine slices per native slice: the smallest `k` with `slice_mm / k <= fine_mm`."""
    if slice_mm <= 0 or fine_mm <= 0:
        raise ValueError(f"slice and fine spacings must be > 0, got {slice_mm}, {fine_mm}")
    return max(1, int(math.ceil(slice_mm / fine_mm - 1e-9)))


def fine_z_offset(slice_mm: float, k: int) -> float:
    """Fine-grid canonical z (mm) of native slice 0's centre.

    Native slice j averages fine slices `j*k .. j*k + k - 1`, whose centre lies at
    `(j*k + (k-1)/2) * slice_mm / k = j * slice_mm + offset` on the fine grid.
    """
    return 0.5 * (k - 1) * slice_mm / k


def partial_volume(fine: np.ndarray, k: int) -> np.ndarray:
    """Averages runs of `k` fine slices (axis 0) into native slices: float32 `[D, H, W]`."""
    if k == 1:
        return fine.astype(np.float32, copy=False)
    d = fine.shape[0] // k
    if d * k != fine.shape[0]:
        raise ValueError(f"{fine.shape[0]} fine slices are not a multiple of k = {k}")
    out = np.zeros((d, *fine.shape[1:]), np.float32)
    # Slice by slice: no float64 temporary of the whole fine volume.
    for i in range(k):
        out += fine[i::k]
    out *= np.float32(1.0 / k)
    return out


def gaussian(volume: np.ndarray, spacing, sigma_mm) -> np.ndarray:
    """Gaussian filter of a float32 `[D, H, W]` volume; `sigma_mm` (sx, sy, sz), 0 = none."""
    if max(sigma_mm) <= 0:
        return volume
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    out = sitk.DiscreteGaussian(
        image,
        variance=[float(s) ** 2 for s in sigma_mm],
        maximumKernelWidth=64,
        maximumError=0.01,
        useImageSpacing=True,
    )
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def correlated_noise(
    rng: np.random.Generator, shape, spacing, std_hu: float, grain_mm: float
) -> np.ndarray:
    """Zero-mean noise of standard deviation `std_hu`, correlated in-plane over `grain_mm`.

    White Gaussian noise is filtered in-plane only (CT reconstructs each slice on its own) and
    rescaled to `std_hu` using the filter's exact variance gain, not the sample's, so the
    level does not depend on the volume's size.
    """
    white = rng.standard_normal(tuple(shape), dtype=np.float32)
    if grain_mm <= 0:
        return white * np.float32(std_hu)
    noise = gaussian(white, spacing, (grain_mm, grain_mm, 0.0))
    # Gain of a unit-variance white field through the in-plane Gaussian: the kernel's sum of
    # squares, measured on an impulse (exact for the discrete kernel SimpleITK applies).
    impulse = np.zeros((1, 33, 33), np.float32)
    impulse[0, 16, 16] = 1.0
    kernel = gaussian(impulse, spacing, (grain_mm, grain_mm, 0.0))
    gain = float(np.sqrt(np.sum(kernel.astype(np.float64) ** 2)))
    noise *= np.float32(std_hu / max(gain, 1e-6))
    return noise


def acquire(
    rng: np.random.Generator,
    fine_hu: np.ndarray,
    k: int,
    spacing,
    psf_sigma_mm: float,
    noise_std_hu: float,
    noise_grain_mm: float,
) -> np.ndarray:
    """Turns a fine-grid HU volume into the native scan (steps 1-3 of the module docstring).

    Args:
        rng: the scan's generator (the noise).
        fine_hu: float32 `[D*k, H, W]` HU on the fine grid.
        k: fine slices per native slice.
        spacing: native (sx, sy, sz) mm.
        psf_sigma_mm: in-plane PSF sigma; along z a third of it (the slice profile already
            smooths z).
        noise_std_hu: noise standard deviation.
        noise_grain_mm: in-plane noise correlation (Gaussian sigma).

    Returns:
        float32 `[D, H, W]` HU, not yet rounded.
    """
    native = partial_volume(fine_hu, k)
    sigma = (psf_sigma_mm, psf_sigma_mm, psf_sigma_mm / 3.0)
    native = gaussian(native, spacing, sigma)
    native += correlated_noise(rng, native.shape, spacing, noise_std_hu, noise_grain_mm)
    return native
