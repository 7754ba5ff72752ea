"""A zero-shot `dinoreg register` loads only what it needs: each module below costs 0.3-1.4 s of
start-up per process (measured with `python -X importtime`), a tenth of a whole registration."""

import subprocess
import sys

import numpy as np
import SimpleITK as sitk

#: module -> what used to pull it in
NOT_NEEDED = {
    "torch._dynamo": "constructing a torch.optim optimiser (optim/adam.py instead)",
    "sympy": "tensor.backward(gradient) (a scalar backward instead)",
    "matplotlib": "the preview (Pillow instead)",
    "transformers": "DINO backbones (only DINO methods)",
    "monai": "losses and blocks of the learned methods",
    "dask": "batch on a cluster",
}


def test_zero_shot_register_command_imports_no_heavy_module_it_does_not_need(tmp_path):
    z, y, x = np.mgrid[:40, :44, :48]
    blob = np.exp(-((x - 24) ** 2 + (y - 22) ** 2 + (z - 20) ** 2) / 120.0).astype(np.float32)
    for name, array in (("fixed.nii.gz", blob), ("moving.nii.gz", np.roll(blob, 2, axis=2))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(tmp_path / name))
    code = (
        "import sys\n"
        "from dinoreg.cli.main import main\n"
        f"status = main(['register', "
        f"{str(tmp_path / 'fixed.nii.gz')!r}, {str(tmp_path / 'moving.nii.gz')!r}, '-o', {str(tmp_path / 'out')!r}, "
        "'--method', 'mind-zeroshot', '--no-affine', '--quiet', '--param', 'adam_iterations=3'])\n"
        f"print(status, [m for m in {sorted(NOT_NEEDED)!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    status, loaded = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "0" and (tmp_path / "out" / "preview.png").is_file()
    assert loaded == "[]", {name: NOT_NEEDED[name] for name in eval(loaded)}
