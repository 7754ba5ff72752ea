"""The panel's parameter node: its state, saved with the scene.

The declarations below are checked by ``Testing/test_slicer_declarations.py`` against the rules of
Slicer's parameter-node GUI connectors for the widget each field is bound to in the ``.ui`` file
(``SlicerParameterName``): a number bound to a slider or spin box must be bounded (``WithinRange``),
else ``connectGui`` raises for sliders (Slicer v5.6.0
Base/Python/slicer/parameterNodeWrapper/guiConnectors.py:316-319) and sets the ranges of spin boxes
to +/- infinity (:326-332) or to the int32 range (:258-267); combo boxes need an enum or a
``Choice``; node selectors take node types.

Outside Slicer (tests with slicer-core) ``parameterNodeWrapper`` does not exist: the class stays a plain
declaration and ``WithinRange`` is a stand-in with the same fields.
"""

# No "from __future__ import annotations": Slicer's wrapper reads these annotations at run time.
from dataclasses import dataclass
from typing import Annotated, Union

from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTextNode, vtkMRMLTransformNode)

try:
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError:  # headless (slicer-core)
    parameterNodeWrapper = None

    @dataclass(frozen=True)
    class WithinRange:  # type: ignore[no-redef]
        """Stand-in for slicer.parameterNodeWrapper.WithinRange (same fields)."""

        minimum: float
        maximum: float

MaskNode = Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]


class DinoRegistrationParameterNode:
    """Inputs, method settings and output choices, then the nodes of the last result (used by the
    Compare and Check sections, also after reloading a saved scene).

    ``regularisation`` and ``iterations``: 0 keeps the method's default (the spin boxes show "method
    default" at their minimum). ``method``, ``preset``, ``device`` and ``featureModel`` are set by the
    panel itself (their lists come from the engine), not bound to widgets.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: MaskNode
    movingMask: MaskNode
    movingSegmentation: MaskNode
    method: str = "auto"
    preset: str = "brain-mr"
    device: str = "auto"
    featureModel: str = ""
    regularisation: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    iterations: Annotated[int, WithinRange(0, 10000)] = 0
    affineStage: bool = True
    inverseConsistent: bool = False
    outputVolume: Union[vtkMRMLScalarVolumeNode, None]
    outputTransform: Union[vtkMRMLTransformNode, None]
    computeInverse: bool = True
    computeJacobian: bool = True
    keepAffine: bool = False
    keepOutputFiles: bool = False
    outputDirectory: str = ""
    viewMode: str = "fade"
    showBefore: bool = False
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fixedLandmarks: Union[vtkMRMLMarkupsFiducialNode, None]
    movingLandmarks: Union[vtkMRMLMarkupsFiducialNode, None]
    resultFixed: vtkMRMLScalarVolumeNode
    resultMoving: vtkMRMLScalarVolumeNode
    resultWarped: vtkMRMLScalarVolumeNode
    resultTransform: vtkMRMLTransformNode
    resultInverseTransform: Union[vtkMRMLTransformNode, None]  # the engine's inverse field: the landmark check uses it
    resultHeatmap: vtkMRMLScalarVolumeNode
    resultHeatmapBefore: vtkMRMLScalarVolumeNode
    resultJacobian: vtkMRMLScalarVolumeNode
    resultReport: Union[vtkMRMLTextNode, None]  # the report.json text node: the landmark check is added to it
    resultFolder: str = ""  # where the engine's files were kept ('' if not kept)


if parameterNodeWrapper is not None:
    DinoRegistrationParameterNode = parameterNodeWrapper(DinoRegistrationParameterNode)
