"""CDL-Λ reconstruction library.

Modules speak tensors only: complex64 images shaped ``(..., ny, nx)`` (ny = phase encoding,
nx = readout), multi-coil data ``(..., coils, ny, nx)``. Nothing here imports ``gadgets``.
"""

__version__ = "0.1.0"
