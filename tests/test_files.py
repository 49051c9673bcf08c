"""Downloads against a real HTTP server on 127.0.0.1 that can be told to misbehave."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dalle2_cli.config import File, ModelLoadConfig
from dalle2_cli.errors import Dalle2Error, InputError
from dalle2_cli.sources.cache import cache_path, default_cache_dir
from dalle2_cli.sources.http import partial_path
from dalle2_cli.sources.resolve import resolve_file

BODY = bytes(range(256)) * 400  # 100 KiB
DIGEST = hashlib.sha256(BODY).hexdigest()


@pytest.fixture(autouse=True)
def online(fast_retries):
    pass


def url_file(server, path, tmp_path, **extra) -> File:
    return File(load_type="url", path=server.url(path), cache_dir=str(tmp_path / "cache"), **extra)


def cached(tmp_path) -> list[str]:
    """Files under their final names in the cache (not partial downloads, not locks)."""
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def partials(tmp_path) -> list[str]:
    directory = tmp_path / "cache" / ".partial"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def cut_without_retries(server, tmp_path, monkeypatch, says: str | None = None, **file_fields) -> File:
    """A download of BODY that the server cuts half-way, with retries off: it fails (with an
    error matching `says`, if given) and leaves its partial file."""
    server.serve("/m.pth", BODY, faults=["cut"])
    monkeypatch.setenv("DALLE2_DOWNLOAD_RETRIES", "0")
    file = url_file(server, "/m.pth", tmp_path, **file_fields)
    with pytest.raises(Dalle2Error, match=says):
        resolve_file(file)
    return file


def test_download_lands_in_cache_and_is_reused(server, tmp_path):
    server.serve("/m/decoder.pth", BODY)
    file = url_file(server, "/m/decoder.pth", tmp_path, sha256=DIGEST)
    path = resolve_file(file)
    assert path == tmp_path / "cache" / "decoder.pth"
    assert path.read_bytes() == BODY
    assert resolve_file(file) == path
    assert len(server.gets("/m/decoder.pth")) == 1  # the second use came from the cache
    assert cached(tmp_path) == ["decoder.pth", "decoder.pth.sha256"] and partials(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="platformdirs' Linux layout")
def test_default_cache_dir_is_per_user_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("DALLE2_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dalle2-cli"  # platformdirs, on Linux
    monkeypatch.setenv("DALLE2_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_filename_override_names_the_cached_file(server, tmp_path):
    server.serve("/latest.pth", BODY)
    path = resolve_file(url_file(server, "/latest.pth", tmp_path, filename_override="prior.pth"))
    assert path.name == "prior.pth" and path.read_bytes() == BODY


def test_resume_after_the_body_is_cut_half_way(server, tmp_path, capsys):
    route = server.serve("/m.pth", BODY, faults=["cut"])
    path = resolve_file(url_file(server, "/m.pth", tmp_path, sha256=DIGEST))
    assert path.read_bytes() == BODY
    first, second = server.gets("/m.pth")
    assert "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={len(BODY) // 2}-"  # only the missing half was asked for
    assert second.headers["If-Range"] == f'"{route.etag}"'  # and only if the file is still the same
    assert "retrying" in capsys.readouterr().err
    assert partials(tmp_path) == []


def test_resume_after_a_connection_reset(server, tmp_path):
    server.serve("/m.pth", BODY, faults=["reset"])
    assert resolve_file(url_file(server, "/m.pth", tmp_path, sha256=DIGEST)).read_bytes() == BODY
    assert server.gets("/m.pth")[1].headers["Range"] == f"bytes={len(BODY) // 2}-"


def test_an_interrupted_download_resumes_in_the_next_run(server, tmp_path, monkeypatch):
    file = cut_without_retries(server, tmp_path, monkeypatch, "run the command again to resume", sha256=DIGEST)
    assert cached(tmp_path) == []  # nothing under the final name
    assert partial_path(cache_path(file)).stat().st_size == len(BODY) // 2
    assert resolve_file(file).read_bytes() == BODY
    assert server.gets("/m.pth")[-1].headers["Range"] == f"bytes={len(BODY) // 2}-"


def test_a_partial_file_of_an_older_version_is_not_spliced(server, tmp_path, monkeypatch):
    file = cut_without_retries(server, tmp_path, monkeypatch)
    new_body = BODY[::-1]
    server.serve("/m.pth", new_body)  # the file changed upstream meanwhile
    assert resolve_file(file).read_bytes() == new_body
    last = server.gets("/m.pth")[-1]
    assert "If-Range" in last.headers  # the server saw the old validator and sent the whole new file


def test_a_resumed_file_that_fails_its_sha256_is_fetched_whole_once_more(server, tmp_path, monkeypatch, capsys):
    new_body = BODY[::-1]
    server.serve("/m.pth", BODY, faults=["cut"], validators=False)  # nothing to tell versions apart
    monkeypatch.setenv("DALLE2_DOWNLOAD_RETRIES", "0")
    file = url_file(server, "/m.pth", tmp_path, sha256=hashlib.sha256(new_body).hexdigest())
    with pytest.raises(Dalle2Error):
        resolve_file(file)
    server.serve("/m.pth", new_body, validators=False)
    assert resolve_file(file).read_bytes() == new_body  # not half of each
    ranges = [s.headers.get("Range") for s in server.gets("/m.pth")]
    assert ranges == [None, f"bytes={len(BODY) // 2}-", None]
    assert "sha256 mismatch after resuming" in capsys.readouterr().err


def test_500_then_success(server, tmp_path, capsys):
    server.serve("/m.pth", BODY, faults=["500", "500"])
    assert resolve_file(url_file(server, "/m.pth", tmp_path)).read_bytes() == BODY
    assert len(server.gets("/m.pth")) == 3
    assert capsys.readouterr().err.count("HTTP 500") == 2


def test_persistent_500_gives_up_with_a_clear_error(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE2_DOWNLOAD_RETRIES", "2")
    server.serve("/m.pth", BODY, faults=["500"] * 5)
    with pytest.raises(Dalle2Error, match=r"download of .*/m.pth failed after retries: HTTP 500"):
        resolve_file(url_file(server, "/m.pth", tmp_path))
    assert len(server.gets("/m.pth")) == 3 and cached(tmp_path) == []


def test_404_is_a_clear_error_and_caches_nothing(server, tmp_path):
    with pytest.raises(Dalle2Error, match=r"cannot download http://127.0.0.1:\d+/missing.pth: HTTP 404"):
        resolve_file(url_file(server, "/missing.pth", tmp_path))
    assert len(server.gets("/missing.pth")) == 1  # not retried: it will not appear
    assert cached(tmp_path) == [] and partials(tmp_path) == []


def test_body_shorter_than_content_length_caches_nothing(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE2_DOWNLOAD_RETRIES", "2")
    server.serve("/short.pth", BODY[:1000], declared_length=len(BODY), ranges=False)
    with pytest.raises(Dalle2Error, match=f"sent 1000 of {len(BODY)} bytes"):
        resolve_file(url_file(server, "/short.pth", tmp_path))
    assert cached(tmp_path) == []


def test_wrong_sha256_caches_nothing(server, tmp_path):
    server.serve("/m.pth", BODY)
    with pytest.raises(Dalle2Error, match=f"has sha256 {DIGEST}, expected 0{{64}}; nothing was cached"):
        resolve_file(url_file(server, "/m.pth", tmp_path, sha256="0" * 64))
    assert cached(tmp_path) == [] and partials(tmp_path) == []


def test_corrupted_cache_file_is_fetched_again_when_sha256_is_known(server, tmp_path):
    server.serve("/m.pth", BODY)
    file = url_file(server, "/m.pth", tmp_path, sha256=DIGEST)
    path = resolve_file(file)
    path.write_bytes(b"garbage")
    assert resolve_file(file).read_bytes() == BODY
    assert len(server.gets("/m.pth")) == 2


def test_a_changed_cache_file_is_fetched_again_even_without_a_known_sha256(server, tmp_path):
    server.serve("/m.pth", BODY)
    file = url_file(server, "/m.pth", tmp_path)
    resolve_file(file).write_bytes(b"garbage")  # differs from what was recorded at download
    assert resolve_file(file).read_bytes() == BODY


def test_changed_remote_checksum_downloads_again(server, tmp_path, capsys):
    new_body = BODY[::-1]
    server.serve("/m.pth", BODY)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{DIGEST}\nsize {len(BODY)}\n"
    server.serve("/m.pth.pointer", pointer.encode())
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/m.pth.pointer"))
    assert resolve_file(file).read_bytes() == BODY
    assert resolve_file(file).read_bytes() == BODY
    assert len(server.gets("/m.pth")) == 1
    new_digest = hashlib.sha256(new_body).hexdigest()
    server.serve("/m.pth", new_body)
    server.serve("/m.pth.pointer", f"oid sha256:{new_digest}\n".encode())
    assert resolve_file(file).read_bytes() == new_body
    assert len(server.gets("/m.pth")) == 2
    assert "changed upstream" in capsys.readouterr().err


def test_unreachable_checksum_uses_the_cached_file(server, tmp_path, capsys):
    server.serve("/m.pth", BODY)
    server.serve("/sum", DIGEST.encode())
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/sum"))
    resolve_file(file)
    del server.routes["/sum"]
    assert resolve_file(file).read_bytes() == BODY
    assert "using the cached file" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(tmp_path):
    file = File(load_type="url", path="http://127.0.0.1:9/x.pth", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(Dalle2Error, match="cannot download http://127.0.0.1:9/x.pth: Connection refused"):
        resolve_file(file)


def test_a_redirect_to_another_scheme_is_refused(server, tmp_path):
    server.serve("/m.pth", b"", status=302, headers={"Location": "ftp://127.0.0.1/m.pth"})
    with pytest.raises(Dalle2Error, match="only http and https are followed"):
        resolve_file(url_file(server, "/m.pth", tmp_path))


CONCURRENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dalle2_cli.config import File
    from dalle2_cli.sources.resolve import resolve_file
    url, cache, digest, ready, go = sys.argv[1:]
    Path(ready).touch()
    while not Path(go).exists():  # all four start together
        time.sleep(0.01)
    print(resolve_file(File(load_type="url", path=url, cache_dir=cache, sha256=digest)))
    """
)


def test_four_processes_download_the_same_file_once(server, tmp_path):
    server.serve("/big.pth", BODY, delay_s=1.0)  # keeps the first download in flight while the others ask
    go = tmp_path / "go"
    procs = []
    for index in range(4):
        args = [server.url("/big.pth"), str(tmp_path / "cache"), DIGEST, str(tmp_path / f"ready{index}"), str(go)]
        procs.append(
            subprocess.Popen([sys.executable, "-c", CONCURRENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err for _, _, err in results]
    assert {out.decode().strip() for _, out, _ in results} == {str(tmp_path / "cache" / "big.pth")}
    assert len(server.gets("/big.pth")) == 1
    assert (tmp_path / "cache" / "big.pth").read_bytes() == BODY
    waited = sum("waiting for another process" in err.decode() for _, _, err in results)
    assert waited >= 1  # the others really did wait on the lock, not arrive after the fact


def test_offline_with_a_warm_cache_touches_no_network(server, tmp_path, monkeypatch):
    server.serve("/m.pth", BODY)
    server.serve("/sum", DIGEST.encode())
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/sum"))
    path = resolve_file(file)
    before = len(server.requests())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_file(file) == path
    assert len(server.requests()) == before  # not even the checksum file was asked for


def test_offline_with_a_cold_cache_names_the_file_and_the_fix(server, tmp_path, monkeypatch):
    server.serve("/m.pth", BODY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = url_file(server, "/m.pth", tmp_path)
    with pytest.raises(Dalle2Error) as error:
        resolve_file(file, config_name="my.json")
    message = str(error.value)
    assert server.url("/m.pth") in message and "offline" in message
    assert "`dalle2 models download -c my.json`" in message
    assert server.requests() == []


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a\0b", "..", "sub/x"])
def test_filename_override_cannot_leave_the_cache(tmp_path, name):
    entry = {"load_type": "url", "path": "https://e.org/p.pth", "filename_override": name}
    config = {"prior": {"load_model_from": entry}}
    with pytest.raises(InputError, match="filename_override: must be a plain file name"):
        ModelLoadConfig.from_dict(config)
    # And if a File skipped validation, the cache refuses it itself.
    file = File.model_construct(
        load_type="url", path="https://e.org/p.pth", cache_dir=str(tmp_path), filename_override=name
    )
    with pytest.raises(InputError, match="filename_override"):
        cache_path(file)


@pytest.mark.parametrize(
    "url", ["https://e.org/", "https://e.org/a/..", "https://e.org/a%2F..%2F..%2Fx", "https://e.org/%00"]
)
def test_names_derived_from_urls_cannot_leave_the_cache(tmp_path, url):
    with pytest.raises(InputError, match="set filename_override"):
        cache_path(File(load_type="url", path=url, cache_dir=str(tmp_path)))


def test_only_http_https_and_hub_urls_are_accepted():
    for path in ("ftp://e.org/x.pth", "file:///etc/passwd", "/local/x.pth"):
        with pytest.raises(InputError, match="http://, https:// or hf://"):
            ModelLoadConfig.from_dict({"prior": {"load_model_from": {"load_type": "url", "path": path}}})
    ModelLoadConfig.from_dict({"prior": {"load_model_from": {"load_type": "url", "path": "hf://org/repo/p.pth"}}})


def test_missing_local_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="model file not found"):
        resolve_file(File(load_type="local", path=str(tmp_path / "nope.pth")))


def test_resume_state_is_kept_beside_the_partial_file(server, tmp_path, monkeypatch):
    file = cut_without_retries(server, tmp_path, monkeypatch)
    state = json.loads(Path(str(partial_path(cache_path(file))) + ".json").read_text())
    assert state["url"] == server.url("/m.pth") and state["validator"]


def test_a_checksum_file_that_is_no_digest_is_a_version_marker(server, tmp_path, capsys):
    # dalle2-laion's gradio and upsampler examples point checksum_file_path at a JSON config's
    # own raw/main address: its text, whatever it is, says which version is current.
    server.serve("/m.pth", BODY)
    server.serve("/raw/config.json", b'{"decoder": {"unets": [{"dim": 16}]}}')
    file = url_file(server, "/m.pth", tmp_path, checksum_file_path=server.url("/raw/config.json"))
    assert resolve_file(file).read_bytes() == BODY
    assert resolve_file(file).read_bytes() == BODY
    assert len(server.gets("/m.pth")) == 1  # the same text: the cached file is current
    new_body = BODY[::-1]
    server.serve("/m.pth", new_body)
    server.serve("/raw/config.json", b'{"decoder": {"unets": [{"dim": 32}]}}')
    assert resolve_file(file).read_bytes() == new_body
    assert len(server.gets("/m.pth")) == 2
    assert "its checksum file changed upstream" in capsys.readouterr().err
