"""The affine step of a transform: ``y = matrix @ x + translation`` in LPS mm.

Its own module, free of torch at import, so that the affine stage (``optim/affine.py``, SimpleITK
only) can run while torch is still loading (the command line starts it first; ``cli/main.py``).
``core/transforms.py`` builds the chains of affine maps and dense fields on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class AffineMap:
    """``y = matrix @ x + translation`` in LPS mm; ``matrix`` 3x3, ``translation`` (3,)."""

    matrix: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def homogeneous(self) -> np.ndarray:
        out = np.eye(4)
        out[:3, :3] = self.matrix
        out[:3, 3] = self.translation
        return out

    @staticmethod
    def from_homogeneous(matrix: np.ndarray) -> "AffineMap":
        return AffineMap(np.asarray(matrix[:3, :3], dtype=np.float64), np.asarray(matrix[:3, 3], dtype=np.float64))

    @staticmethod
    def from_sitk(transform: sitk.Transform) -> "AffineMap":
        """Any linear SimpleITK transform (Euler, Similarity, Affine, identity...), probed with points."""
        origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
        columns = [np.array(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
        return AffineMap(np.stack(columns, axis=1), origin)

    def inverse(self) -> "AffineMap":
        return AffineMap.from_homogeneous(np.linalg.inv(self.homogeneous))

    def then(self, other: "AffineMap") -> "AffineMap":
        """The map ``x -> other(self(x))``."""
        return AffineMap.from_homogeneous(other.homogeneous @ self.homogeneous)

    def apply(self, points: Any) -> Any:
        """Map physical points ``(..., 3)`` (a torch tensor; the result has its dtype and device)."""
        matrix = points.new_tensor(self.matrix)
        offset = points.new_tensor(self.translation)
        return points @ matrix.T + offset
