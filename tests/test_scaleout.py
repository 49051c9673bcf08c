"""Scale-out text2im (dalle2_cli.run): the job split and the manifest on their own, then
real launches of two CPU processes (gloo) against a one-process run, a run killed midway and
finished with --resume, and the refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dalle2_cli.cli.guard import FLAGS
from dalle2_cli.config import load_config
from dalle2_cli.errors import InputError, SettingError
from dalle2_cli.io.prompts import Prompt
from dalle2_cli.run import Request, run
from dalle2_cli.sampling.settings import SamplingSettings
from dalle2_cli.scaleout.jobs import cut_batches, plan_jobs, share
from dalle2_cli.scaleout.manifest import ManifestWriter, manifest_path, prepare, read_manifests
from dalle2_cli.scaleout.works import TextToImageWork
from tests.helpers import run_cli

# 15 images in 8 batches of 2: batches straddle prompts, the last is short, one prompt has its
# own count and seed, and a repeated prompt gets the "-2" names.
PROMPTS = (
    '{"prompt": "a red circle"}\n{"prompt": "a blue square", "n": 3, "seed": 40}\n'
    '{"prompt": "a red circle"}\n{"prompt": "a green triangle"}\n'
)
IMAGES = 15
# Enough decoder steps that a run lasts a few seconds, so that it can be killed midway.
RUN = ("-n", "4", "--seed", "5", "--batch-size", "2", "--prior-steps", "4", "--decoder-steps", "8", "--device", "cpu")
ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(*args: str, processes: int = 2) -> list[str]:
    # `accelerate launch --cpu --num_processes 2` starts one process (accelerate runs several CPU
    # processes only through mpirun); --multi_gpu starts them with torchrun, and on a machine
    # without GPUs (and with --device cpu) they run on the CPU, talking over gloo.
    return [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "dalle2_cli", "text2im", *args,
    ]  # fmt: skip


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        launch_command(*args), cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **ENV}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def pngs(directory: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """Every PNG: its recorded settings and its pixels."""
    found = {}
    for path in sorted(directory.glob("*.png")):
        with Image.open(path) as image:
            found[path.name] = (json.loads(image.text["dalle2-cli"]), np.asarray(image.convert("RGB")))
    return found


def assert_same_images(made: Path, reference: dict) -> None:
    images = pngs(made)
    assert sorted(images) == sorted(reference)
    for name, (metadata, pixels) in images.items():
        assert metadata == reference[name][0], name  # prompt, seed, index, settings, model files
        assert np.array_equal(pixels, reference[name][1]), name  # exactly: same batches as one process


def recorded_files(directory: Path) -> list[str]:
    files = []
    for path in sorted(directory.glob("manifest-rank*.jsonl")):
        files += [entry["file"] for entry in map(json.loads, path.read_text().splitlines()) if "file" in entry]
    return files


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_config) -> tuple[Path, tuple[str, ...]]:
    """A directory holding the prompts file, and the options of every run here."""
    root = tmp_path_factory.mktemp("scaleout")
    (root / "prompts.jsonl").write_text(PROMPTS)
    return root, ("--prompts-file", "prompts.jsonl", "-c", str(tiny_config), *RUN)


@pytest.fixture(scope="module")
def reference(work) -> dict:
    """What plain `dalle2 text2im` makes, in one process."""
    root, options = work
    run_cli("text2im", *options, "-o", "one", "-q", cwd=root, check=True, env=ENV)
    images = pngs(root / "one")
    assert len(images) == IMAGES and not list((root / "one").glob("manifest*"))  # plain runs keep no manifest
    return images


# -- the split and the manifest ----------------------------------------------------------------


def test_plan_is_a_one_process_runs_order_seeds_and_names():
    prompts = [Prompt("a red circle"), Prompt("a blue square", 2, 40), Prompt("a red circle")]
    jobs = plan_jobs(prompts, 2, seed=5)
    assert [(j.prompt_number, j.index, j.seed, j.file) for j in jobs] == [
        (0, 0, 5, "a-red-circle-5.png"),
        (0, 1, 6, "a-red-circle-6.png"),
        (1, 0, 40, "a-blue-square-40.png"),
        (1, 1, 41, "a-blue-square-41.png"),
        (2, 0, 5, "a-red-circle-5-2.png"),
        (2, 1, 6, "a-red-circle-6-2.png"),
    ]
    assert [j.number for j in jobs] == list(range(6))
    assert [j.file for j in plan_jobs(prompts, 2, seed=5, template="{index}")] == [
        "0.png", "1.png", "0-2.png", "1-2.png", "0-3.png", "1-3.png",
    ]  # fmt: skip


@pytest.mark.parametrize("processes", [1, 2, 3, 5, 9])
def test_every_batch_goes_to_exactly_one_process(processes):
    jobs = plan_jobs([Prompt(f"prompt {i}", i + 1) for i in range(6)], 1, seed=0)
    batches = cut_batches(jobs, 4)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1]  # as one process cuts them, whatever the split
    shares = [share(batches, process, processes) for process in range(processes)]
    handed = sorted(job.number for part in shares for batch in part for job in batch)
    assert handed == list(range(len(jobs)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_manifest_survives_a_line_cut_short(tmp_path):
    jobs = plan_jobs(["a red circle"], 3, seed=1)
    with ManifestWriter(tmp_path, 0, {"seed": 1}) as manifest:
        manifest.record(jobs[0])
    with open(manifest_path(tmp_path, 0), "a") as file:
        file.write('{"file": "a-red-circle-2.png", "pro')  # killed while appending
    with ManifestWriter(tmp_path, 0, {"seed": 1}) as manifest:  # the next run appends on a new line
        manifest.record(jobs[2])
    lines = manifest_path(tmp_path, 0).read_text().splitlines()
    assert len(lines) == 4 and sum('"settings"' in line for line in lines) == 1
    state = read_manifests(tmp_path)
    assert state.settings == {"seed": 1}
    assert state.finished == {"a-red-circle-1.png", "a-red-circle-3.png"}


def test_manifests_of_two_runs_are_refused(tmp_path):
    ManifestWriter(tmp_path, 0, {"seed": 1}).close()
    ManifestWriter(tmp_path, 1, {"seed": 2}).close()
    with pytest.raises(InputError, match="different runs"):
        read_manifests(tmp_path)


def test_prepare_decides_what_is_left(tmp_path):
    prompts = [Prompt("a red circle", 3), Prompt("a blue square", 2)]
    jobs = plan_jobs(prompts, 1, seed=7)
    fresh = prepare(prompts, 1, 7, 2, tmp_path)
    assert fresh.todo == [(0, (0, 1)), (1, (2, 3)), (2, (4,))] and fresh.finished == 0

    for job in jobs[:3]:  # a first run finished three images and recorded two
        Image.new("RGB", (4, 4)).save(tmp_path / job.file)
    with ManifestWriter(tmp_path, 1, fresh.settings) as manifest:
        manifest.record(jobs[0])
        manifest.record(jobs[1])
    (tmp_path / f".{jobs[3].file}.x1y2.part").write_bytes(b"half")  # a write the kill interrupted
    (tmp_path / ".notes.txt.abc.part").write_bytes(b"not ours")

    with pytest.raises(InputError, match="add resume=True to finish it, or use another directory"):
        prepare(prompts, 1, 7, 2, tmp_path)
    resumed = prepare(prompts, 1, None, 2, tmp_path, resume=True)  # the seed comes from the manifest
    assert resumed.seed == 7 and resumed.finished == 2
    assert resumed.todo == [(1, (2, 3)), (2, (4,))]  # the unrecorded file is made again
    assert not (tmp_path / f".{jobs[3].file}.x1y2.part").exists()
    assert (tmp_path / ".notes.txt.abc.part").exists()

    (tmp_path / jobs[0].file).unlink()  # recorded, but gone: made again
    assert prepare(prompts, 1, 7, 2, tmp_path, resume=True).todo[0] == (0, (0,))
    # The library names its own fields; the CLI names the options that set them.
    with pytest.raises(SettingError, match="made with seed 7, not 8") as refused:
        prepare(prompts, 1, 8, 2, tmp_path, resume=True)
    assert refused.value.field == "seed"
    assert "with --seed 7, not 8" in refused.value.naming(lambda field: FLAGS[field])
    with pytest.raises(SettingError, match="batch_size 2, not 3"):
        prepare(prompts, 1, 7, 3, tmp_path, resume=True)
    with pytest.raises(InputError, match="other prompts"):
        prepare([Prompt("a red circle", 4)], 1, 7, 2, tmp_path, resume=True)


def test_files_that_no_manifest_records_are_not_replaced_silently(tmp_path):
    prompts = [Prompt("a red circle")]
    (tmp_path / "a-red-circle-3.png").write_bytes(b"someone else's")
    for resume in (False, True):
        with pytest.raises(InputError, match="already holds a-red-circle-3.png"):
            prepare(prompts, 2, 3, 4, tmp_path, resume=resume)
    assert prepare(prompts, 2, 3, 4, tmp_path, overwrite=True).todo == [(0, (0, 1))]


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_processes(work) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run, launched as two processes."""
    root, options = work
    return root / "two", launch(*options, "-o", "two", "--json", cwd=root)


def test_reranked_runs_scale_out_to_the_files_of_one(tmp_path, reranking_config):
    """The config's default reranking under a launch: each process reranks the images it makes,
    and the kept images are a one-process run's, candidates' seeds and scores included."""
    options = ("a red circle", "a blue square", "-c", str(reranking_config), "-n", "3", "--seed", "5")
    options += ("--batch-size", "2", "--prior-steps", "2", "--decoder-steps", "2", "--device", "cpu")
    run_cli("text2im", *options, "-o", "one", "-q", cwd=tmp_path, check=True, env=ENV)
    one = pngs(tmp_path / "one")
    assert len(one) == 6 and all(metadata["rerank"]["candidates"] == 3 for metadata, _ in one.values())
    launch(*options, "-o", "two", cwd=tmp_path)
    assert_same_images(tmp_path / "two", one)


def test_two_processes_make_the_files_of_one(work, reference, two_processes):
    root, _ = work
    _, result = two_processes
    assert_same_images(root / "two", reference)
    assert sorted(recorded_files(root / "two")) == sorted(reference)  # each image recorded once
    assert {p.name for p in (root / "two").glob("manifest-rank*.jsonl")} == {
        "manifest-rank0.jsonl",
        "manifest-rank1.jsonl",
    }
    report = json.loads(result.stdout.strip().splitlines()[-1])  # printed by the main process only
    assert [p["process"] for p in report["processes"]] == [0, 1]
    assert [p["images"] for p in report["processes"]] == [8, 7]  # batches 0, 2, 4, 6 and 1, 3, 5, 7
    assert [Path(i["path"]).name for i in report["images"]] == [n for n in _plan_order(root)]
    assert "all: 15 image(s)" in result.stderr and "with 2 processes" in result.stderr


def _plan_order(root: Path) -> list[str]:
    from dalle2_cli.io.prompts import read_prompts

    return [job.file for job in plan_jobs(read_prompts(str(root / "prompts.jsonl")), 4, seed=5)]


def test_a_killed_run_finishes_with_resume(work, reference):
    root, options = work
    out = root / "killed"
    runner = subprocess.Popen(
        launch_command(*options, "-o", "killed"),
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV},
    )
    deadline = time.monotonic() + 240
    while len(recorded_files(out) if out.is_dir() else []) < 3:
        assert runner.poll() is None, runner.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # A pre-empted machine: the launcher and both workers die at once, mid-batch.
    processes = [psutil.Process(runner.pid), *psutil.Process(runner.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    runner.wait()
    runner.stderr.close()
    done_before = {name: (out / name).stat().st_ino for name in recorded_files(out)}
    assert 3 <= len(done_before) < IMAGES, "the run finished before it could be killed"

    launch(*options, "-o", "killed", "--resume", cwd=root)
    assert_same_images(out, reference)  # exactly one copy of every image, none half-written
    assert sorted(recorded_files(out)) == sorted(reference)
    assert not [p.name for p in out.iterdir() if p.suffix == ".part" or p.name.startswith(".")]
    # What the first run finished was kept, not made again (a new file would have a new inode).
    assert {name: (out / name).stat().st_ino for name in done_before} == done_before


def test_resume_with_other_settings_is_refused(work, two_processes):
    root, options = work
    made, _ = two_processes
    before = sorted(p.name for p in made.iterdir())
    result = run_cli("text2im", *options, "--seed", "6", "-o", str(made), "--resume", cwd=root, env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {made} was made with --seed 5, not 6: "
                     "resume with the first run's settings to finish it, or use another output directory"]  # fmt: skip
    assert sorted(p.name for p in made.iterdir()) == before


def test_from_python_and_a_changed_model_setting(tiny_config, tmp_path):
    settings = SamplingSettings(seed=3, batch_size=2, prior_steps=2, decoder_steps=[2])
    config = load_config(str(tiny_config))

    def request(settings: SamplingSettings) -> Request:
        work = TextToImageWork([Prompt("a red circle")], 3)
        return Request(work, config, "tiny", tmp_path, settings, load={"device": "cpu"}, resume=True)

    report = run(request(settings), say=lambda _: None)
    assert [Path(i["path"]).name for i in report["images"]] == [f"a-red-circle-{s}.png" for s in (3, 4, 5)]
    again = run(request(settings), say=lambda _: None)
    assert again["images"] == [] and again["already_done"] == 3
    changed = SamplingSettings(seed=3, batch_size=2, prior_steps=2, decoder_steps=[3])
    with pytest.raises(InputError, match=r"made with decoder_steps \[2, 2\], not \[3, 3\]"):
        run(request(changed), say=lambda _: None)


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--prompts-file", "-"), {"WORLD_SIZE": "2"}, "cannot share standard input"),
    ],
)
def test_refusals(tmp_path, args, env, says):
    result = run_cli("text2im", "a red circle", *args, "-o", str(tmp_path), env=env, input="a blue square\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
