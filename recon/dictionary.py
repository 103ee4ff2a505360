"""Convolutional dictionaries: K real, unit-ℓ2-norm k_f×k_f filters, applied in the FFT domain.

Convention (true circular convolution, filter centred at the origin):
    (D s) = Σ_k d_k ∗ s_k,   (d ∗ s)[p] = Σ_q d[q + c] s[p − q],  c = k_f // 2,
i.e. each filter is zero-padded to the image grid and rolled so that its centre tap sits at pixel (0, 0); then
D s = F⁻¹( Σ_k d̂_k · ŝ_k ) and Dᴴ r = F⁻¹( conj(d̂_k) · r̂ ) (a cross-correlation). A dictionary learned with
cross-correlation (e.g. a CNN's conv2d) converts by a 180° flip of each filter: ``Dictionary(filters.flip(-1, -2))``.

Filter spectra are computed once per image size and device and cached. The Lipschitz constant of s ↦ D s is exact
and cheap: ‖D‖² = max_ω Σ_k |d̂_k(ω)|² (with the orthonormal FFT, d̂ here is the *unnormalised* DFT of the filter).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F

from cdl_lambda.recon.checksum import sha256_of_bytes

NORM_TOLERANCE = 1e-3


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """Complex view of ``x`` keeping its precision (float64 → complex128, else complex64)."""
    if x.is_complex():
        return x
    return x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)


class DictionaryError(ValueError):
    """A dictionary file or tensor is unusable (wrong shape, non-finite values, non-unit norms, unreadable)."""


def validate_filters(filters: torch.Tensor, source: str = "dictionary") -> None:
    """Raise DictionaryError unless ``filters`` is a finite real (K, k_f, k_f) tensor with unit-norm filters."""
    if not isinstance(filters, torch.Tensor):
        raise DictionaryError(f"{source}: filters must be a tensor, got {type(filters).__name__}")
    if filters.ndim != 3 or filters.shape[1] != filters.shape[2] or filters.shape[0] < 1:
        raise DictionaryError(f"{source}: filters must have shape (K, k_f, k_f), got {tuple(filters.shape)}")
    if filters.is_complex() or not filters.is_floating_point():
        raise DictionaryError(f"{source}: filters must be real floating point, got {filters.dtype}")
    if not torch.isfinite(filters).all():
        raise DictionaryError(f"{source}: filters contain NaN or Inf")
    norms = filters.flatten(1).norm(dim=1)
    worst = (norms - 1).abs().max().item()
    if worst > NORM_TOLERANCE:
        raise DictionaryError(f"{source}: filters must have unit ℓ2 norm (worst deviation {worst:.3g})")


class Dictionary:
    """K real unit-norm k_f×k_f filters with FFT-domain synthesis D and adjoint Dᴴ.

    Codes ``s``: complex ``(..., K, ny, nx)``; images: complex ``(..., ny, nx)``; native FFT layout is not required
    (convolution commutes with circular shifts), but D and Dᴴ must see the same layout.
    """

    def __init__(self, filters: torch.Tensor, name: str = "unnamed", meta: dict | None = None):
        filters = torch.as_tensor(filters)
        validate_filters(filters, source=f"dictionary {name!r}")
        self.filters = filters.to(torch.float32)
        self.name = name
        self.meta = dict(meta or {})
        self._spectra: dict[tuple, torch.Tensor] = {}
        self._resampled: dict[float, Dictionary] = {}

    @property
    def num_filters(self) -> int:
        return self.filters.shape[0]

    @property
    def kernel_size(self) -> int:
        return self.filters.shape[-1]

    def __repr__(self) -> str:
        return f"Dictionary(name={self.name!r}, K={self.num_filters}, k_f={self.kernel_size})"

    def permuted(self, order: torch.Tensor) -> "Dictionary":
        """The same dictionary with its filters reordered by ``order``."""
        return Dictionary(self.filters[order], name=f"{self.name}-permuted", meta=self.meta)

    @property
    def scale(self) -> float:
        """How many times finer a pixel grid these filters were resampled onto (1: as learned)."""
        return float(self.meta.get("scale", 1.0))

    def resampled(self, scale: float) -> "Dictionary":
        """The same filters on a pixel grid ``scale`` times finer (the same physical extent in smaller pixels, as a
        larger matrix over the same field of view has): each filter interpolated bicubically onto
        k′ = 2·round(scale·(k − 1)/2) + 1 taps (halves round to even), its old taps where they were
        (k′ − 1 = s·(k − 1), s the scale that odd k′ allows: :attr:`scale` of the result, which β follows), then set
        to unit norm again. Cached per scale; ``scale`` 1 is this dictionary."""
        if not scale > 0:
            raise DictionaryError(f"dictionary {self.name!r}: scale must be positive, got {scale}")
        if scale == 1:
            return self
        if scale not in self._resampled:
            k = self.kernel_size
            taps = 2 * round(scale * (k - 1) / 2) + 1
            if taps < 3:
                raise DictionaryError(f"dictionary {self.name!r}: scale {scale:g} leaves fewer than 3 taps")
            filters = F.interpolate(self.filters[:, None].double(), size=(taps, taps), mode="bicubic",
                                    align_corners=True)[:, 0]
            filters = filters / filters.flatten(1).norm(dim=1)[:, None, None]
            meta = {**self.meta, "scale": self.scale * (taps - 1) / (k - 1), "kernel_size": taps}
            self._resampled[scale] = Dictionary(filters.float(), name=self.name, meta=meta)
        return self._resampled[scale]

    # ---- FFT-domain machinery -------------------------------------------------------------------------------
    def spectra(self, shape: tuple[int, int], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.complex64) -> torch.Tensor:
        """d̂_k on an ``shape`` grid: ``(K, ny, nx)`` of ``dtype``, cached per (shape, device, dtype)."""
        device = torch.device(device)
        key = (tuple(shape), device.type, device.index, dtype)
        if key not in self._spectra:
            ny, nx = shape
            kf = self.kernel_size
            if kf > ny or kf > nx:
                raise DictionaryError(f"filters of size {kf} do not fit an image of shape {shape}")
            real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
            padded = torch.zeros(self.num_filters, ny, nx, device=device, dtype=real_dtype)
            padded[:, :kf, :kf] = self.filters.to(device=device, dtype=real_dtype)
            padded = torch.roll(padded, shifts=(-(kf // 2), -(kf // 2)), dims=(-2, -1))
            self._spectra[key] = torch.fft.fft2(padded).to(dtype)
        return self._spectra[key]

    def lipschitz(self, shape: tuple[int, int]) -> float:
        """‖D‖² = max_ω Σ_k |d̂_k(ω)|² on an image grid of ``shape`` (exact)."""
        return float(self.spectra(shape).abs().pow(2).sum(dim=0).max())

    def synthesize_fourier(self, codes_hat: torch.Tensor) -> torch.Tensor:
        """Σ_k d̂_k ŝ_k for code spectra ``(..., K, ny, nx)`` → image spectrum ``(..., ny, nx)``."""
        d_hat = self.spectra(codes_hat.shape[-2:], codes_hat.device, codes_hat.dtype)
        return (codes_hat * d_hat).sum(dim=-3)  # faster than einsum's batched matmul on the CPU

    def synthesize(self, codes: torch.Tensor) -> torch.Tensor:
        """D s = Σ_k d_k ∗ s_k: ``(..., K, ny, nx)`` → ``(..., ny, nx)``."""
        codes = _as_complex(codes)
        return torch.fft.ifft2(self.synthesize_fourier(torch.fft.fft2(codes)))

    def analyze(self, image: torch.Tensor) -> torch.Tensor:
        """Dᴴ x (correlation with each filter): ``(..., ny, nx)`` → ``(..., K, ny, nx)``."""
        image = _as_complex(image)
        d_hat = self.spectra(image.shape[-2:], image.device, image.dtype)
        return torch.fft.ifft2(torch.fft.fft2(image).unsqueeze(-3) * d_hat.conj())

    # ---- I/O ------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"filters": self.filters.cpu(), "name": self.name, "meta": self.meta}, buffer)
        return buffer.getvalue()

    def save(self, path: str | Path) -> str:
        """Write the dictionary; returns its sha256."""
        data = self.to_bytes()
        Path(path).write_bytes(data)
        return sha256_of_bytes(data)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "Dictionary":
        """Load and validate a dictionary file (safe: tensors and plain types only). With ``sha256`` given, a file
        whose checksum differs is refused."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DictionaryError(f"cannot read dictionary file {path}: {error.strerror or error}") from None
        if sha256 is not None and sha256_of_bytes(data) != sha256:
            raise DictionaryError(f"dictionary file {path} does not match its checksum (corrupt or tampered)")
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - truncated zip, not a torch file, disallowed pickle content
            raise DictionaryError(f"dictionary file {path} is not a readable dictionary: {error}") from None
        if not isinstance(payload, dict) or "filters" not in payload:
            raise DictionaryError(f"dictionary file {path} has no 'filters' entry")
        return cls(payload["filters"], name=str(payload.get("name", path.stem)), meta=payload.get("meta") or {})


def dct_dictionary(kernel_size: int = 7) -> Dictionary:
    """The analytic 2-D DCT-II dictionary without its constant atom: k_f² − 1 separable cosine filters, unit norm.
    A classical, data-independent dictionary, used as the built-in fallback and as an out-of-family test case."""
    n = torch.arange(kernel_size, dtype=torch.float64)
    basis = torch.stack([torch.cos(torch.pi * (n + 0.5) * k / kernel_size) for k in range(kernel_size)])
    atoms = (basis[:, None, :, None] * basis[None, :, None, :]).reshape(-1, kernel_size, kernel_size)[1:]
    atoms = atoms / atoms.flatten(1).norm(dim=1)[:, None, None]
    return Dictionary(atoms.float(), name=f"dct-{kernel_size}x{kernel_size}",
                      meta={"K": kernel_size ** 2 - 1, "kernel_size": kernel_size, "learned_on": "analytic (DCT-II)"})
