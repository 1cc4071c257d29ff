"""Runs tf_agg3d commands as a user does (a subprocess), and writes tiny inputs for them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_command(module: str, *args, env_extra=None, drop_env=(), timeout=180):
    """``python -m <module> <args>`` from the repository; the CompletedProcess (text)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    for name in drop_env:
        env.pop(name, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", module, *[str(a) for a in args]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_eval_inputs(folder) -> dict[str, str]:
    """A one-nodule annotations CSV, a predictions CSV that finds it, and the scan list."""
    uids = ["1.3.6.1", "1.3.6.2"]
    files = {
        "annotations": os.path.join(folder, "annotations.csv"),
        "predictions": os.path.join(folder, "predictions.csv"),
        "seriesuids": os.path.join(folder, "seriesuids.csv"),
    }
    with open(files["annotations"], "w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.3.6.1,10.0,-20.0,30.0,8.0\n")
    with open(files["predictions"], "w") as f:
        f.write(
            "seriesuid,coordX,coordY,coordZ,probability\n"
            "1.3.6.1,10.5,-20.0,30.0,0.9\n1.3.6.1,60.0,60.0,60.0,0.4\n"
            "1.3.6.2,-40.0,0.0,5.0,0.7\n"
        )
    with open(files["seriesuids"], "w") as f:
        f.write("".join(f"{u}\n" for u in uids))
    return files


def write_luna16_folder(root, broken: bool = True) -> None:
    """A LUNA16-layout folder: one good scan (1.2.4) and, with `broken`, a truncated one (1.2.3)."""
    import SimpleITK as sitk

    os.makedirs(os.path.join(root, "subset0"), exist_ok=True)
    volume = np.full((24, 48, 48), -1000, np.int16)
    volume[:, 8:40, 8:40] = 40  # body
    volume[4:20, 14:34, 12:22] = -850  # lungs
    volume[4:20, 14:34, 26:36] = -850
    uids = ("1.2.3", "1.2.4") if broken else ("1.2.4",)
    for uid in uids:
        sitk.WriteImage(sitk.GetImageFromArray(volume), os.path.join(root, "subset0", f"{uid}.mhd"))
    if broken:
        with open(os.path.join(root, "subset0", "1.2.3.raw"), "r+b") as f:
            f.truncate(100)
