"""CDL-Λ reconstruction library.

What the product runs, and only that: FFTs and sampling masks, MRI operators, coil preprocessing, the low-pass
split, dictionaries, FISTA, the Λ networks, the CDL-Λ model, the reconstruction pipeline, the weights registry and
the device choice. Modules speak tensors only: complex64 images shaped ``(..., ny, nx)`` (ny = phase encoding,
nx = readout), multi-coil data ``(..., coils, ny, nx)``. Nothing here imports ``gadgets`` or the research package
``lab`` (simulation, training, evaluation), which builds on this one.
"""

__version__ = "0.1.0"
