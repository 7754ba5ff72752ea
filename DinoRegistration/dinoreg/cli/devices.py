"""``dinoreg devices``: what this Python can run on, for people and for the Slicer panel.

Reports the engine's packages that are missing or too old (from :mod:`.requirements`), the PyTorch
version (or why it does not load) and each GPU with its free memory. torch is imported inside
:func:`probe_devices` only, so the command also works, and says so, where torch is missing.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, Dict



#: optional package family -> the methods that need it (see requirements.EXTRA_REQUIREMENTS)
FAMILY_USERS = {"dino": "DINO feature methods (dino-*)", "losses": "training and learned instance optimisation with LNCC"}


def probe_devices() -> Dict[str, Any]:
    """``{"python", "platform", "missing", "outdated", "install", "torch", "torch_error", "cuda": [{index, name,
    free_mb, total_mb}], "mps"}``; memory in MiB, measured now."""
    from dinoreg.requirements import check_requirements  # lazy: reads package metadata, not needed to start dinoreg

    info: Dict[str, Any] = {"python": platform.python_version(), "platform": sys.platform, **check_requirements(),
                            "torch": None, "torch_error": None, "cuda": [], "mps": False}
    if "torch" in info["missing"]:
        return info
    try:
        import torch  # lazy: torch is not needed to start this command

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                info["cuda"].append({"index": index, "name": torch.cuda.get_device_name(index),
                                     "free_mb": free // 2**20, "total_mb": total // 2**20})
        backends = getattr(torch, "backends", None)
        info["mps"] = bool(getattr(getattr(backends, "mps", None), "is_available", lambda: False)())
    except Exception as error:  # a broken torch (e.g. after a NumPy upgrade) is reported, not raised
        info["torch_error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return info


def command_devices(args: Any) -> int:
    """Print the probe as JSON (``--json``) or as a few lines; exit 0 even when something is missing."""
    info = probe_devices()
    if getattr(args, "json", False):
        print(json.dumps(info))
        return 0
    print(f"Python {info['python']} ({info['platform']})")
    for key, label in (("missing", "missing packages"), ("outdated", "packages too old")):
        if info[key]:
            print(f"{label}: {', '.join(info[key])}")
    if info["install"]:
        print(f"install with: pip install {' '.join(repr(r) for r in info['install'])}")
    for family, used_by in FAMILY_USERS.items():
        lacking = info["optional"][family]["missing"] + info["optional"][family]["outdated"]
        if lacking:
            print(f"{used_by} need {', '.join(lacking)}: pip install \"dinoreg[{family}]\"")
    if info["torch_error"]:
        print(f"PyTorch does not load: {info['torch_error']}")
    elif info["torch"]:
        gpus = ", ".join(f"cuda:{g['index']} {g['name']} ({g['free_mb'] / 1024:.1f} of {g['total_mb'] / 1024:.1f} GB free)"
                         for g in info["cuda"])
        print(f"PyTorch {info['torch']}; GPU: {gpus or ('Apple MPS' if info['mps'] else 'none (CPU only)')}")
    return 0
