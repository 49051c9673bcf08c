"""Hostile inputs and conditions that once broke: each now ends in one clear line (and a
non-zero exit) or in the right behaviour, with nothing lost or half-written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.config import File
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.io.atomic import write_new
from dalle2_cli.io.output import read_metadata
from dalle2_cli.scaleout.jobs import plan_jobs
from dalle2_cli.sources.cache import cache_path
from dalle2_cli.sources.digests import sha256_of, sidecar_path
from dalle2_cli.sources.http import _ResumeState, partial_path
from dalle2_cli.sources.resolve import resolve_file
from tests.helpers import edit_config, error_lines, invoke, run_cli

BODY = bytes(range(256)) * 400
DIGEST = hashlib.sha256(BODY).hexdigest()


@pytest.fixture(autouse=True)
def online(fast_retries):
    pass


def rot(path: Path) -> None:
    """Change one byte of `path`, keeping its size and its modification time."""
    status = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


# -- 1. bytes that rot in the cache -------------------------------------------------------------


@pytest.mark.parametrize("with_sha256", [True, False])
def test_a_cached_file_whose_bytes_rotted_is_downloaded_again(server, tmp_path, capsys, with_sha256):
    server.serve("/m.pth", BODY)
    extra = {"sha256": DIGEST} if with_sha256 else {}
    file = File(load_type="url", path=server.url("/m.pth"), cache_dir=str(tmp_path / "cache"), **extra)
    rot(resolve_file(file))
    assert resolve_file(file).read_bytes() == BODY
    assert len(server.gets("/m.pth")) == 2
    assert "damaged" in capsys.readouterr().err or with_sha256


def test_a_rotted_cached_file_offline_is_an_error_not_a_black_image(server, tmp_path, tiny_config):
    prior = tiny_config.parent / "prior.pth"
    server.serve("/prior.pth", prior.read_bytes())

    def edit(data):
        data["prior"]["load_model_from"] = {
            "load_type": "url",
            "path": server.url("/prior.pth"),
            "cache_dir": str(tmp_path / "cache"),
        }

    config = edit_config(tiny_config, tmp_path / "c.json", edit)
    resolve_file(File(load_type="url", path=server.url("/prior.pth"), cache_dir=str(tmp_path / "cache")))
    rot(tmp_path / "cache" / "prior.pth")
    result = run_cli("text2im", "a red circle", "-c", str(config), "--offline", "-o", "out", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "prior.pth has sha256" in line and "damaged" in line and "offline" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_local_file_that_does_not_match_its_sha256_is_refused(tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes(BODY)
    file = File(load_type="local", path=str(path), sha256=DIGEST)
    assert resolve_file(file) == path
    rot(path)
    with pytest.raises(InputError, match="has sha256 .* but the config expects"):
        resolve_file(file)


def test_metadata_records_the_digest_of_the_bytes_used(tiny_config, tmp_path):
    result = invoke("text2im", "a red circle", "-c", tiny_config, "--seed", "1", "-o", tmp_path / "out", "--json")
    [image] = json.loads(result.stdout)["images"]
    recorded = read_metadata(Path(image["path"]))["model_sha256"]
    assert recorded["prior"] == sha256_of(tiny_config.parent / "prior.pth")
    assert set(recorded) == {"clip", "prior", "decoder unets 1", "decoder unets 2"}


# -- 2. two runs writing one directory ------------------------------------------------------------


def test_writers_racing_for_one_name_each_keep_their_file(tmp_path):
    results: list[Path] = []

    def write(content: bytes) -> None:
        path, _ = write_new(tmp_path, "image", ".png", lambda tmp: tmp.write_bytes(content))
        results.append(path)

    threads = [threading.Thread(target=write, args=(bytes([n]) * 100,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 16
    assert sorted(p.read_bytes()[0] for p in tmp_path.glob("image*.png")) == list(range(16))
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_two_runs_into_one_directory_lose_no_image(tiny_config, tmp_path):
    command = [
        sys.executable,
        "-m",
        "dalle2_cli",
        "text2im",
        "a red circle",
        "-c",
        str(tiny_config),
        "-n",
        "3",
        "--seed",
        "1",
        "-o",
        "out",
        "-q",
    ]
    runs = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert len(list((tmp_path / "out").glob("*.png"))) == 6


# -- 3, 4. --resume and what a run may ask for ----------------------------------------------------


def test_resume_makes_again_an_image_left_empty_or_cut_short(tiny_config, tmp_path):
    args = ["text2im", "a red circle", "-c", tiny_config, "-n", "3", "--seed", "2", "-o", tmp_path / "out", "--resume"]
    first = invoke(*args, "--json")
    assert first.returncode == 0, first.stderr
    paths = [Path(image["path"]) for image in json.loads(first.stdout)["images"]]
    originals = [np.asarray(Image.open(p)) for p in paths]
    paths[0].write_bytes(b"")
    paths[1].write_bytes(paths[1].read_bytes()[:100])
    again = invoke(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(image["path"] for image in json.loads(again.stdout)["images"]) == sorted(map(str, paths[:2]))
    for path, original in zip(paths, originals, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), original)


def test_planning_thousands_of_repeated_prompts_names_them_in_order():
    jobs = plan_jobs(["a cat"] * 8000 + ["a cat-2"], 1, seed=0, template="{prompt}")
    names = [job.file for job in jobs]
    assert names[:3] == ["a-cat.png", "a-cat-2.png", "a-cat-3.png"] and len(set(names)) == 8001
    assert names[-1] == "a-cat-2-2.png"  # "a-cat-2.png" was given to the second "a cat"


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        ('{"prompt": "a cat", "n": 1000000000}\n', '"n" must be at most 100,000'),
        (
            '{"prompt": "a cat", "n": 60000}\n{"prompt": "a dog", "n": 60000}\n',
            "this run asks for 120,000 images, more than 100,000",
        ),
    ],
)
def test_a_request_for_too_many_images_is_refused_at_once(tmp_path, lines, says):
    (tmp_path / "p.jsonl").write_text(lines)
    for extra in ([], ["--resume"]):
        result = run_cli("text2im", "--prompts-file", "p.jsonl", "-c", "shapes", "-o", "out", *extra, cwd=tmp_path)
        assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr


# -- 5. pipes and devices where files are expected ------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_as_model_or_checksum_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="model file .* is not a regular file"):
        resolve_file(File(load_type="local", path=str(fifo)))
    for checksum in (str(fifo), "/dev/zero"):
        url = "http://127.0.0.1:9/m.pth"
        file = File(load_type="url", path=url, cache_dir=str(tmp_path / "cache"), checksum_file_path=checksum)
        with pytest.raises(InputError, match="checksum file .* is not a regular file"):
            resolve_file(file)


def test_a_huge_checksum_file_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "sum"
    with open(huge, "wb") as handle:
        handle.truncate(2 * 2**30)  # sparse: 2 GB that take no disk
    file = File(
        load_type="url", path="http://127.0.0.1:9/m.pth", cache_dir=str(tmp_path / "c"), checksum_file_path=str(huge)
    )
    with pytest.raises(InputError, match="checksum file .* is 2,147,483,648 bytes, too large"):
        resolve_file(file)


# -- 6. NaN ---------------------------------------------------------------------------------------


def test_nan_guidance_in_a_config_is_refused(tiny_config, tmp_path):
    config = edit_config(tiny_config, tmp_path / "c.json", lambda d: d["prior"].update(default_cond_scale=float("nan")))
    result = invoke("text2im", "x", "-c", config, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: {config}: prior.default_cond_scale: Input should be a finite number"]


# -- 7. stopping a run ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_keeps_the_images_it_finished_and_no_temporary_file(tiny_config, tmp_path, sig):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dalle2_cli", "text2im", "a red circle", "-c", str(tiny_config)]
    run = subprocess.Popen(
        [*command, "-n", "40", "--batch-size", "1", "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell starts background jobs with Ctrl-C ignored, and so may CI.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == (143 if sig == signal.SIGTERM else 130), stderr
    assert stderr.splitlines()[-1] in (
        "terminated: images finished so far are saved",
        "interrupted: images finished so far are saved",
    )
    saved = list(out.glob("*.png"))
    assert 1 <= len(saved) < 40 and all(read_metadata(p)["prompt"] == "a red circle" for p in saved)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# -- 8. downloads killed at the worst moments -----------------------------------------------------


def test_a_download_killed_after_its_last_byte_is_not_fetched_again(server, tmp_path):
    server.serve("/m.pth", BODY)
    file = File(load_type="url", path=server.url("/m.pth"), cache_dir=str(tmp_path / "cache"), sha256=DIGEST)
    partial = partial_path(cache_path(file))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BODY)  # every byte arrived, then the process died before the rename
    etag = f'"{server.routes["/m.pth"].etag}"'
    _ResumeState(file.path, DIGEST, validator=etag, total=len(BODY)).save(partial)
    leftover = cache_path(file).parent / f".{sidecar_path(cache_path(file)).name}.ab12cd.part"
    leftover.write_text("half a record")  # killed between the record's write and its rename
    assert resolve_file(file).read_bytes() == BODY
    [request] = server.gets("/m.pth")
    assert request.headers["Range"] == f"bytes={len(BODY)}-"  # answered 416: nothing more to send
    assert not leftover.exists()


# -- 9. errors that must be one clear line ---------------------------------------------------------


def test_a_redirect_loop_is_one_line(server, tmp_path):
    server.serve("/loop", b"", status=302, headers={"Location": "/loop"})
    with pytest.raises(Dalle2Error) as caught:
        resolve_file(File(load_type="url", path=server.url("/loop"), cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(caught.value) and "redirect" in str(caught.value)


def test_a_clip_pretrained_pickle_is_refused_in_one_line(tiny_config, tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "clip.pt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "evil": Evil()}, evil)

    def edit(data):
        data["clip"] = {"make": "open_clip", "model": "ViT-B-32", "pretrained": str(evil)}

    config = edit_config(tiny_config, tmp_path / "c.json", edit)
    result = invoke("text2im", "x", "-c", config, "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert "refusing to load" in line and "weights_only=False" not in line


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"decoder": {"unet_sources": [{"unet_numbers": [1, 10000000]}]}}', "less than or equal to 16"),
        (
            json.dumps(
                {
                    "prior": {
                        "load_model_from": {"load_type": "url", "path": "https://a/b", "filename_override": "x" * 400}
                    }
                }
            ).encode(),
            "filename_override: Value error, is 400 bytes long".replace("Value error, ", ""),
        ),
    ],
)
def test_bad_configs_are_one_short_line(tmp_path, content, says):
    (tmp_path / "c.json").write_bytes(content)
    result = invoke("config", "show", "-c", tmp_path / "c.json")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert says in line and len(line) < 400, line
    assert len(result.stderr.splitlines()) == 1


def test_a_very_long_url_file_name_is_refused_clearly(tmp_path):
    file = File(load_type="url", path="https://example.org/" + "x" * 300 + ".pth", cache_dir=str(tmp_path))
    with pytest.raises(InputError, match="is 304 bytes long"):
        resolve_file(file)


def test_a_huge_checksum_url_is_refused_not_taken_as_a_version(server, tmp_path):
    """A url's checksum body is capped as a local file's is: no more than the cap + 1 bytes are
    read, and the file is refused, not taken as a version marker."""
    server.serve("/sum", b"0" * (2**16 + 1))
    file = File(
        load_type="url", path=server.url("/m.pth"), cache_dir=str(tmp_path / "c"), checksum_file_path=server.url("/sum")
    )
    with pytest.raises(InputError, match=r"checksum file http://.*/sum is over 65,536 bytes, too large"):
        resolve_file(file)
    assert not server.gets("/m.pth")  # nothing downloaded on its word
