"""Hugging Face hub files: `hf://` and huggingface.co urls parsed, and fetched through
huggingface_hub with HF_ENDPOINT pointed at a local server that answers as the hub does.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so the
downloads run in a fresh process: the real `dalle2` command.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dalle2_cli.errors import InputError
from dalle2_cli.sources.hub import HubFile, parse_hub_url
from tests.helpers import run_cli
from tests.http_server import COMMIT, FakeServer

PRIOR = bytes(range(256)) * 300
DECODER = bytes(reversed(range(256))) * 500
PRIOR_CONFIG = b'{"prior": {"net": {"dim": 8}}}'


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf://laion/DALLE2-PyTorch/prior/latest.pth", HubFile("laion/DALLE2-PyTorch", "prior/latest.pth")),
        ("hf://org/repo/a/b/c.pth@v1.0", HubFile("org/repo", "a/b/c.pth", "v1.0")),
        ("hf://org/repo/c.pth@refs/pr/3", HubFile("org/repo", "c.pth", "refs/pr/3")),
        ("hf://org/repo@" + COMMIT + "/c.pth", HubFile("org/repo", "c.pth", COMMIT)),  # huggingface_hub's order
        ("hf://datasets/org/data/x.json", HubFile("org/data", "x.json", "main", "dataset")),
        (
            "https://huggingface.co/laion/DALLE2-PyTorch/resolve/main/decoder/1.5B_laion2B/latest.pth",
            HubFile("laion/DALLE2-PyTorch", "decoder/1.5B_laion2B/latest.pth"),
        ),
        ("https://huggingface.co/org/repo/resolve/refs%2Fpr%2F1/x.pth", HubFile("org/repo", "x.pth", "refs/pr/1")),
        ("https://hf.co/datasets/org/d/resolve/v2/x.bin", HubFile("org/d", "x.bin", "v2", "dataset")),
        ("https://huggingface.co/gpt2/resolve/main/model.bin", HubFile("gpt2", "model.bin")),
        # Not hub downloads: fetched as plain urls.
        ("https://huggingface.co/laion/DALLE2-PyTorch/raw/main/prior/latest.pth", None),
        ("https://example.org/org/repo/resolve/main/x.pth", None),
    ],
)
def test_hub_urls_parse(url, expected):
    assert parse_hub_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "hf://org/repo",
        "hf://org/repo/",
        "hf://org/repo/../x.pth",
        "hf://org/repo/x.pth@",
        "hf://o/r@a/x@b",
        "hf://o!/r/x",
    ],
)
def test_malformed_hub_urls_are_refused(url):
    with pytest.raises(InputError, match=r"hf://"):
        parse_hub_url(url)


def test_hf_uri_round_trips():
    for uri in ("hf://org/repo/a/x.pth", "hf://org/repo/x.pth@v1", "hf://datasets/org/d/x.json"):
        assert parse_hub_url(uri).uri == uri


def test_a_mirror_named_by_hf_endpoint_is_the_hub(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8123")
    assert parse_hub_url("http://127.0.0.1:8123/org/repo/resolve/main/x.pth") == HubFile("org/repo", "x.pth")


@pytest.fixture
def hub():
    served = FakeServer()
    served.serve("/org/dalle/resolve/main/prior.pth", PRIOR, hub=True)
    served.serve("/org/dalle/resolve/main/prior_config.json", PRIOR_CONFIG, hub=True, lfs=False)
    served.serve("/org/dalle/resolve/v1/decoder.pth", DECODER, hub=True)
    yield served
    served.close()


def hub_config(tmp_path: Path, decoder_sha256: str | None = None, prior: str = "hf://org/dalle/prior.pth") -> Path:
    decoder = {"load_type": "url", "path": "hf://org/dalle/decoder.pth@v1"}
    if decoder_sha256:
        decoder["sha256"] = decoder_sha256
    config = {
        "prior": {
            "load_model_from": {"load_type": "url", "path": prior},
            "load_config_from": {
                "load_type": "url",
                "path": "https://huggingface.co/org/dalle/resolve/main/prior_config.json",
            },
        },
        "decoder": {"unet_sources": [{"unet_numbers": [1], "load_model_from": decoder}]},
    }
    path = tmp_path / "hub-config.json"
    path.write_text(json.dumps(config))
    return path


def env_for(server: FakeServer, tmp_path: Path, home: str = "hf", **extra: str) -> dict[str, str]:
    return {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(tmp_path / home),
        "DALLE2_CACHE_DIR": str(tmp_path / "dalle2-cache"),
        "HF_HUB_OFFLINE": "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


def test_hub_files_go_through_huggingface_hub_and_its_cache(hub, tmp_path):
    config = hub_config(tmp_path)
    env = env_for(hub, tmp_path)
    result = run_cli("models", "download", "-c", str(config), "--json", env=env)
    assert result.returncode == 0, result.stderr
    files = {f["role"]: f for f in json.loads(result.stdout)["files"]}
    snapshot = tmp_path / "hf" / "hub" / "models--org--dalle" / "snapshots" / COMMIT
    assert files["prior"]["path"] == str(snapshot / "prior.pth") and files["prior"]["source"] == "hub"
    assert Path(files["prior"]["path"]).read_bytes() == PRIOR
    assert Path(files["prior config"]["path"]).read_bytes() == PRIOR_CONFIG
    assert Path(files["decoder unet 1"]["path"]).read_bytes() == DECODER
    # huggingface_hub's own protocol: HEAD for the metadata, then GET; and its blob layout,
    # an LFS file's blob named by its sha256.
    for path in ("/org/dalle/resolve/main/prior.pth", "/org/dalle/resolve/v1/decoder.pth"):
        assert [s.method for s in hub.requests(path)] == ["HEAD", "GET"]
    assert "dalle2-cli/" in hub.requests("/org/dalle/resolve/main/prior.pth")[0].headers["user-agent"]
    assert Path(files["prior"]["path"]).resolve().name == hashlib.sha256(PRIOR).hexdigest()
    assert not (tmp_path / "dalle2-cache").exists() or not any((tmp_path / "dalle2-cache").iterdir())

    # Online again: the hub is asked whether the files changed (HEAD), nothing is downloaded.
    assert run_cli("models", "download", "-c", str(config), env=env).returncode == 0
    assert len([s for s in hub.requests() if s.method == "GET"]) == 3

    # Offline with a warm cache: not one request.
    before = len(hub.requests())
    offline = run_cli("models", "download", "-c", str(config), "--offline", env=env)
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests()) == before
    assert run_cli("models", "download", "-c", str(config), env={**env, "HF_HUB_OFFLINE": "1"}).returncode == 0
    assert len(hub.requests()) == before


def test_offline_with_a_cold_hub_cache_names_the_file_and_the_fix(hub, tmp_path):
    config = hub_config(tmp_path)
    result = run_cli("models", "download", "-c", str(config), env=env_for(hub, tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: hf://org/dalle/prior.pth is not in the Hugging Face cache")
    assert f"`dalle2 models download -c {config}`" in lines[-1] and "Traceback" not in result.stderr
    assert hub.requests() == []


def test_a_missing_hub_file_is_a_clear_error(hub, tmp_path):
    config = hub_config(tmp_path, prior="hf://org/dalle/nope.pth")
    result = run_cli("models", "download", "-c", str(config), env=env_for(hub, tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: hf://org/dalle/nope.pth: the hub has no file 'nope.pth' in org/dalle at 'main'"
    )


def test_a_hub_file_with_another_sha256_than_the_config_says_is_refused(hub, tmp_path):
    config = hub_config(tmp_path, decoder_sha256="0" * 64)
    result = run_cli("models", "download", "-c", str(config), env=env_for(hub, tmp_path))
    assert result.returncode == 1
    assert "hf://org/dalle/decoder.pth@v1 has sha256" in result.stderr and "expects 000" in result.stderr


def test_models_list_verify_and_rm_cover_hub_files(hub, tmp_path):
    config = hub_config(tmp_path, decoder_sha256=hashlib.sha256(DECODER).hexdigest())
    env = env_for(hub, tmp_path)
    assert run_cli("models", "download", "-c", str(config), env=env).returncode == 0

    listed = json.loads(run_cli("models", "list", "-c", str(config), "--json", env=env, check=True).stdout)
    hub_files = {f["name"]: f for f in listed["files"] if f["source"] == "hub"}
    assert set(hub_files) == {
        "hf://org/dalle/prior.pth",
        "hf://org/dalle/prior_config.json",
        "hf://org/dalle/decoder.pth@v1",
    }
    assert hub_files["hf://org/dalle/prior.pth"]["size"] == len(PRIOR)
    assert hub_files["hf://org/dalle/prior.pth"]["configs"] == [str(config)]
    assert listed["hub_cache_dir"] == str(tmp_path / "hf" / "hub")

    verified = json.loads(run_cli("models", "verify", "-c", str(config), "--json", env=env, check=True).stdout)
    assert verified["ok"] and {f["status"] for f in verified["files"]} == {"ok"}
    # The small file is checked against its git object id, the LFS files against their sha256.
    details = {f["name"]: f["detail"] for f in verified["files"]}
    assert details["hf://org/dalle/prior_config.json"].startswith("git object id")

    blob = Path(hub_files["hf://org/dalle/prior.pth"]["path"]).resolve()
    blob.write_bytes(PRIOR[:-1] + b"\x00")  # a flipped byte
    bad = run_cli("models", "verify", "-c", str(config), env=env)
    assert bad.returncode == 1
    assert "bad\thf://org/dalle/prior.pth\tsha256" in bad.stdout
    assert bad.stderr.strip().startswith("error: 1 file(s) failed verification (hf://org/dalle/prior.pth)")

    # Any hub file can be removed by its hf:// name; the blob goes with its last snapshot entry.
    removed = run_cli("models", "rm", "hf://org/dalle/prior.pth", "--json", env=env, check=True)
    assert str(blob) in json.loads(removed.stdout)["removed"] and not blob.exists()
    after = json.loads(run_cli("models", "list", "-c", str(config), "--json", env=env, check=True).stdout)
    assert {f["name"] for f in after["files"]} == {"hf://org/dalle/prior_config.json", "hf://org/dalle/decoder.pth@v1"}
    run_cli("models", "rm", "-c", str(config), env=env, check=True)
    after = json.loads(run_cli("models", "list", "-c", str(config), "--json", env=env, check=True).stdout)
    assert after["files"] == []
