"""The DINO feature backend's parameters and their defaults: light (no torch), so the method
registry can list them without loading the backend. 0 means "auto": chosen per device by
``slicewise.effective_settings`` (CPU: coarse tokens, every 4th slice; GPU: fine tokens, every 2nd slice)."""

from __future__ import annotations

from typing import Any

from dinoreg.store.backbones import DEFAULT_MODEL

DEFAULT_PARAMS: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "slice_axes": "axial",       # "axial", "coronal", "sagittal" or "all"
    "token_mm": 0.0,             # physical size of one ViT token in the resized slices (mm); 0 = auto
    "slice_stride": 0,           # encode every n-th slice and interpolate between; 0 = auto
    "pca_channels": 24,          # joint PCA of fixed + moving tokens
    "batch_size": 0,             # slices per forward pass; 0 = auto
    "precision": "auto",         # "auto" | "fp32" | "fp16" | "bf16"
    "ct_window": "-1000,1000",   # HU window "low,high" mapped to grey for CT-looking images (MR: percentiles)
}
