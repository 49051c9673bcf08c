"""scripts/train_shapes.py at a tiny scale: every stage runs, the files it writes load as a
config like the shipped one, and an interrupted run resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dalle2_cli.config import PACKAGE_DIR, load_config
from dalle2_cli.manager import DalleModelManager

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_shapes.py"


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "0.001", "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_tiny_run_writes_loadable_files_and_resumes(tmp_path):
    out, work = tmp_path / "weights", tmp_path / "work"
    first = train("--out", str(out), "--work-dir", str(work))
    assert first.returncode == 0, first.stderr
    assert "[decoder-upsampler]" in first.stdout and "done in" in first.stdout
    assert {p.name for p in out.iterdir()} == {
        "clip.safetensors",
        "prior.pth",
        "decoder-base.pth",
        "decoder-upsampler.pth",
    }

    # The shipped config, pointed at these files, loads every stage strictly.
    shipped = json.loads((ROOT / "configs" / "shapes.json").read_text())
    text = json.dumps(shipped).replace("package://weights/shapes", str(out))
    assert str(PACKAGE_DIR) not in text
    (tmp_path / "tiny-shapes.json").write_text(text)
    manager = DalleModelManager(load_config(str(tmp_path / "tiny-shapes.json")), log=lambda _: None)
    assert manager.decoder.num_unets == 2 and manager.prior is not None

    again = train("--out", str(out), "--work-dir", str(work))
    assert again.returncode != 0 and "--resume" in again.stderr  # an earlier run is never overwritten
    resumed = train("--out", str(out), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "[prior] resumed at step" in resumed.stdout and "[decoder-base] resumed at step" in resumed.stdout
