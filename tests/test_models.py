"""`dalle2 models download|list|verify|rm` and `--offline`, through the real CLI in a
subprocess, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from tests.helpers import edit_config, run_cli
from tests.http_server import COMMIT, FakeServer

PRIOR = bytes(range(256)) * 200
DECODER = bytes(reversed(range(256))) * 300


def env_for(tmp_path: Path, cache: str = "cache", **extra: str) -> dict[str, str]:
    return {
        "DALLE2_CACHE_DIR": str(tmp_path / cache),
        "DALLE2_DOWNLOAD_BACKOFF": "0.01",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "",
        **extra,
    }


def url_config(server: FakeServer, tmp_path: Path) -> Path:
    server.serve("/files/prior.pth", PRIOR)
    server.serve("/files/decoder.pth", DECODER)
    config = {
        "prior": {
            "load_model_from": {
                "load_type": "url",
                "path": server.url("/files/prior.pth"),
                "sha256": hashlib.sha256(PRIOR).hexdigest(),
            }
        },
        "decoder": {
            "unet_sources": [
                {
                    "unet_numbers": [1],
                    "load_model_from": {
                        "load_type": "url",
                        "path": server.url("/files/decoder.pth"),
                        "filename_override": "my-decoder.pth",
                    },
                }
            ]
        },
    }
    path = tmp_path / "urls.json"
    path.write_text(json.dumps(config))
    return path


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_download_list_verify_rm(server, tmp_path):
    config = str(url_config(server, tmp_path))
    env = env_for(tmp_path)
    cache = tmp_path / "cache"

    result = run_cli("models", "download", "-c", config, "--json", env=env)
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [(f["role"], f["source"], Path(f["path"]).name, f["size"]) for f in files] == [
        ("prior", "url", "prior.pth", len(PRIOR)),
        ("decoder unet 1", "url", "my-decoder.pth", len(DECODER)),
    ]
    assert (cache / "my-decoder.pth").read_bytes() == DECODER
    assert f"downloading prior.pth from {server.url('/files/prior.pth')}" in result.stderr  # no bar off a terminal

    listed = json.loads(run_cli("models", "list", "-c", config, "--json", env=env, check=True).stdout)
    assert listed["cache_dir"] == str(cache)
    entries = {f["name"]: f for f in listed["files"]}
    assert set(entries) == {"prior.pth", "my-decoder.pth"}
    assert entries["prior.pth"]["size"] == len(PRIOR) and entries["prior.pth"]["configs"] == [config]
    assert entries["my-decoder.pth"]["sha256"] == hashlib.sha256(DECODER).hexdigest()  # recorded at download
    text = run_cli("models", "list", "-c", config, env=env, check=True).stdout
    assert f"prior.pth\t{len(PRIOR) / 1000:.1f} kB\t{config}\t{cache / 'prior.pth'}" in text

    verified = run_cli("models", "verify", "-c", config, env=env)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.count("ok\t") == 2
    assert run_cli("models", "verify", env=env).returncode == 0  # every cached file

    (cache / "my-decoder.pth").write_bytes(b"\0" * len(DECODER))  # same size: only a re-hash notices
    bad = run_cli("models", "verify", "-c", config, env=env)
    assert bad.returncode == 1
    assert "bad\tmy-decoder.pth\tsha256" in bad.stdout and "recorded at download" in bad.stdout
    assert last_line(bad) == (
        "error: 1 file(s) failed verification (my-decoder.pth): remove with `dalle2 models rm my-decoder.pth`, "
        f"then fetch with `dalle2 models download -c {config}`"
    )
    assert run_cli("models", "verify", env=env).returncode == 1

    removed = run_cli("models", "rm", "my-decoder.pth", "--json", env=env, check=True)
    assert json.loads(removed.stdout)["removed"] == [str(cache / "my-decoder.pth")]
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["prior.pth", "prior.pth.sha256"]
    missing = run_cli("models", "verify", "-c", config, env=env)
    assert missing.returncode == 1 and "missing\tmy-decoder.pth" in missing.stdout

    # Download again only what is missing.
    assert run_cli("models", "download", "-c", config, env=env).returncode == 0
    assert len(server.gets("/files/prior.pth")) == 1 and len(server.gets("/files/decoder.pth")) == 2

    assert run_cli("models", "rm", "--all", env=env, check=True).returncode == 0
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    assert run_cli("models", "list", env=env, check=True).stdout.strip().endswith("no model files cached")


def test_rm_needs_something_to_remove_and_known_names(tmp_path):
    env = env_for(tmp_path)
    nothing = run_cli("models", "rm", env=env)
    assert nothing.returncode == 2 and last_line(nothing).startswith("error: say what to remove")
    unknown = run_cli("models", "rm", "nope.pth", env=env)
    assert unknown.returncode == 2
    assert last_line(unknown) == "error: 'nope.pth' is not cached: `dalle2 models list` shows the names of cached files"


def test_rm_refuses_a_file_being_downloaded(server, tmp_path):
    config = str(url_config(server, tmp_path))
    env = env_for(tmp_path)
    run_cli("models", "download", "-c", config, env=env, check=True)
    with FileLock(tmp_path / "cache" / ".locks" / "prior.pth.lock"):  # as a downloading process holds it
        busy = run_cli("models", "rm", "prior.pth", env=env)
    assert busy.returncode == 1
    assert last_line(busy) == "error: prior.pth is being downloaded by another process; try again when it finishes"
    assert (tmp_path / "cache" / "prior.pth").exists()


def test_an_interrupted_download_is_listed_partial_and_resumed(server, tmp_path):
    config = str(url_config(server, tmp_path))
    server.routes["/files/prior.pth"].faults = ["cut"]
    env = env_for(tmp_path, DALLE2_DOWNLOAD_RETRIES="0")
    failed = run_cli("models", "download", "-c", config, env=env)
    assert failed.returncode == 1 and "run the command again to resume" in last_line(failed)
    listed = json.loads(run_cli("models", "list", "--json", "-c", config, env=env, check=True).stdout)
    assert [(f["name"], f["status"], f["size"]) for f in listed["files"]] == [("prior.pth", "partial", len(PRIOR) // 2)]
    assert "partial\tprior.pth" in run_cli("models", "verify", "-c", config, env=env).stdout

    assert run_cli("models", "download", "-c", config, env=env).returncode == 0
    assert server.gets("/files/prior.pth")[-1].headers["Range"] == f"bytes={len(PRIOR) // 2}-"
    assert (tmp_path / "cache" / "prior.pth").read_bytes() == PRIOR


def test_download_offline_with_a_cold_cache_fails_clearly(server, tmp_path):
    config = str(url_config(server, tmp_path))
    result = run_cli("models", "download", "-c", config, "--offline", env=env_for(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line(result) == (
        f"error: {server.url('/files/prior.pth')} is not cached (expected at {tmp_path / 'cache' / 'prior.pth'}) "
        "and offline mode is on (--offline or HF_HUB_OFFLINE): "
        f"fetch it first with `dalle2 models download -c {config}` while online"
    )
    assert server.requests() == []


def serve_tiny_model(server: FakeServer, tiny_config: Path, tmp_path: Path) -> Path:
    """The tiny model's config, with every file served over http instead of read locally."""

    def to_urls(data):
        for key, value in list(data.items()) if isinstance(data, dict) else enumerate(data):
            if isinstance(value, dict) and value.get("load_type") == "local":
                local = Path(value["path"])
                server.serve(f"/tiny/{local.name}", local.read_bytes())
                data[key] = {"load_type": "url", "path": server.url(f"/tiny/{local.name}")}
            elif isinstance(value, dict | list):
                to_urls(value)

    return edit_config(tiny_config, tmp_path / "tiny-urls.json", to_urls)


def test_generation_offline_uses_the_cache_and_names_missing_files(server, tiny_config, tmp_path):
    config = str(serve_tiny_model(server, tiny_config, tmp_path))
    env = env_for(tmp_path)
    cold = run_cli("text2im", "a red circle", "-c", config, "--offline", "-o", str(tmp_path / "out"), env=env)
    assert cold.returncode == 1 and "Traceback" not in cold.stderr
    message = last_line(cold)
    assert "is not cached" in message and "/tiny/" in message and f"`dalle2 models download -c {config}`" in message
    assert server.requests() == []

    run_cli("models", "download", "-c", config, env=env, check=True)
    fetched = len(server.requests())
    warm = run_cli("text2im", "a red circle", "-c", config, "--offline", "--json", "-o", str(tmp_path / "out"), env=env)
    assert warm.returncode == 0, warm.stderr
    assert len(json.loads(warm.stdout)["images"]) == 1
    assert len(server.requests()) == fetched  # nothing more was asked of the network


def test_the_laion_preset_downloads_through_the_hub_with_its_clip(tmp_path):
    """`models download -c laion-1.5B` with HF_ENDPOINT at a local stand-in for the hub: the
    preset's huggingface.co urls and open_clip's CLIP weights all go through huggingface_hub."""
    hub = FakeServer()
    try:
        files = {
            "/laion/DALLE2-PyTorch/resolve/main/prior/latest.pth": b"prior" * 100,
            "/laion/DALLE2-PyTorch/resolve/main/prior/prior_config.json": b'{"prior": {}}',
            "/laion/DALLE2-PyTorch/resolve/main/decoder/1.5B_laion2B/latest.pth": b"decoder" * 100,
            "/laion/DALLE2-PyTorch/resolve/main/decoder/1.5B_laion2B/decoder_config.json": b'{"decoder": {}}',
            "/timm/vit_large_patch14_clip_224.openai/resolve/main/open_clip_model.safetensors": b"clip" * 100,
        }
        for path, body in files.items():
            hub.serve(path, body, hub=True)
        env = env_for(tmp_path, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1")
        result = run_cli("models", "download", "-c", "laion-1.5B", "--json", env=env)
        assert result.returncode == 0, result.stderr
        fetched = {f["role"]: f for f in json.loads(result.stdout)["files"]}
        assert set(fetched) == {"prior", "prior config", "decoder unet 1", "decoder unet 1 config", "clip"}
        assert {f["source"] for role, f in fetched.items() if role != "clip"} == {"hub"}
        assert fetched["clip"]["location"] == "open_clip ViT-L-14 (openai)"
        hub_dir = tmp_path / "hf" / "hub"
        assert fetched["clip"]["path"].startswith(str(hub_dir / "models--timm--vit_large_patch14_clip_224.openai"))
        assert Path(fetched["prior"]["path"]) == hub_dir / "models--laion--DALLE2-PyTorch" / "snapshots" / COMMIT / (
            "prior/latest.pth"
        )
        for path in files:
            assert [s.method for s in hub.requests(path)] == ["HEAD", "GET"]
        # The LFS pointers of checksum_file_path are not needed: the hub's ETag is the checksum.
        assert not any("/raw/" in s.path for s in hub.requests())

        # Everything is there for offline use now: not one request.
        before = len(hub.requests())
        offline = run_cli("models", "download", "-c", "laion-1.5B", "--offline", env=env)
        assert offline.returncode == 0, offline.stderr
        assert len(hub.requests()) == before
    finally:
        hub.close()
