"""scripts/train_shapes.py at a tiny scale: every stage runs, the files it writes load as a
config like the shipped one, and an interrupted run resumes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dalle2_cli.config import PACKAGE_DIR, load_config
from dalle2_cli.io.atomic import current_umask
from dalle2_cli.loading.checkpoint import read_checkpoint
from dalle2_cli.loading.manager import DalleModelManager

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
    # The shipped config, pointed at the files this run writes, with their digests recorded.
    shipped = json.loads((ROOT / "configs" / "shapes.json").read_text())
    text = json.dumps(shipped).replace("package://weights/shapes", str(out))
    assert str(PACKAGE_DIR) not in text
    (tmp_path / "tiny-shapes.json").write_text(text)
    first = train("--out", str(out), "--work-dir", str(work), "--record-digests", str(tmp_path / "tiny-shapes.json"))
    assert first.returncode == 0, first.stderr
    assert "[decoder-upsampler]" in first.stdout and "done in" in first.stdout
    # The text stage moved the text tower only: the decoders' image embeddings stay the joint CLIP's.
    assert "[clip-text] step" in first.stdout
    shipped_clip = load_file(out / "clip.safetensors")
    joint = load_file(work / "seed0" / "clip" / "joint.safetensors")
    assert shipped_clip.keys() == joint.keys()
    assert all(torch.equal(shipped_clip[k], joint[k]) for k in joint if k.startswith("visual."))
    assert any(not torch.equal(shipped_clip[k], joint[k]) for k in joint if not k.startswith("visual."))
    assert {p.name for p in out.iterdir()} == {
        "clip.safetensors",
        "prior.pth",
        "decoder-base.pth",
        "decoder-upsampler.pth",
    }
    # Written under a private temporary name, then given the mode any new file gets: a model
    # trained on a shared machine is readable by whom the umask allows.
    new_file_mode = 0o666 & ~current_umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: new_file_mode for p in out.iterdir()}

    # That config loads every stage strictly, each file checked against its new digest.
    recorded = json.loads((tmp_path / "tiny-shapes.json").read_text())
    assert recorded["prior"]["load_model_from"]["sha256"] != shipped["prior"]["load_model_from"]["sha256"]
    manager = DalleModelManager(load_config(str(tmp_path / "tiny-shapes.json")), log=lambda _: None)
    assert manager.decoder.num_unets == 2 and manager.prior is not None

    again = train("--out", str(out), "--work-dir", str(work))
    assert again.returncode != 0 and "--resume" in again.stderr  # an earlier run is never overwritten
    clip_state = work / "seed0" / "clip" / "state.pt"
    finished_clip = clip_state.read_bytes()
    clip_state.touch()  # a resumed run must not rewrite a finished stage: a run beside it may be reading
    touched = clip_state.stat().st_mtime_ns
    resumed = train("--out", str(out), "--work-dir", str(work), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert clip_state.stat().st_mtime_ns == touched and clip_state.read_bytes() == finished_clip
    assert "[prior] resumed at step" in resumed.stdout and "[decoder-base] resumed at step" in resumed.stdout


def test_steps_override_and_probes_that_leave_training_unchanged(tmp_path):
    """--steps sets a stage's length; --probe-every judges the base's samples as it trains,
    drawing no training randomness (the same weights with and without probes)."""
    runs = {}
    for name, extra in (("plain", ()), ("probed", ("--probe-every", "3"))):
        out = tmp_path / name
        result = train(
            "--out", str(out), "--work-dir", str(tmp_path / f"work-{name}"),
            "--stages", "clip,decoder-base", "--steps", "decoder-base=5", *extra,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "[decoder-base] step 5/5" in result.stdout
        runs[name] = (result.stdout, read_checkpoint(out / "decoder-base.pth").state_dict)

    probes = re.findall(
        r"\[decoder-base\] step (\d+) probe \(48 held-out scenes, 25 steps, guidance 3\): "
        r"colour (\d+) %, shape (\d+) %, background (\d+) %",
        runs["probed"][0],
    )
    assert [int(p[0]) for p in probes] == [3, 5]  # every 3 steps, and at the last
    assert all(0 <= int(figure) <= 100 for p in probes for figure in p[1:])
    assert " probe (" not in runs["plain"][0]
    plain, probed = runs["plain"][1], runs["probed"][1]
    assert plain.keys() == probed.keys()
    assert all(torch.equal(plain[key], probed[key]) for key in plain)


def test_a_bad_steps_override_is_refused(tmp_path):
    result = train("--out", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--steps", "decoder=5")
    assert result.returncode == 2
    assert "--steps decoder=5: give STAGE=N" in result.stderr and "Traceback" not in result.stderr


def test_bf16_precision_trains_under_autocast_and_records_it(tmp_path):
    """--precision bf16 changes the computation (other weights than fp32 from the same seed) and
    is written into each trained file's embedded training config."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        result = train(
            "--out", str(out), "--work-dir", str(tmp_path / f"work-{precision}"),
            "--stages", "clip,prior,decoder-base", "--steps", "decoder-base=3", "--precision", precision,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        for name in ("prior.pth", "decoder-base.pth"):
            assert read_checkpoint(out / name).config["train"]["precision"] == precision
        runs[precision] = read_checkpoint(out / "decoder-base.pth").state_dict
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32.keys() == bf16.keys()
    assert any(not torch.equal(fp32[key], bf16[key]) for key in fp32)
