"""Names of the files one registration writes (light: no imports, shared by the engine and Slicer)."""

OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "heatmap": "heatmap.nii.gz",
    "heatmap_before": "heatmap_before.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "transform": "transform.h5",
    "inverse_transform": "inverse_transform.h5",
    "warped_labels": "warped_labels.nii.gz",
    "report": "report.json",
    "preview": "preview.png",
}
