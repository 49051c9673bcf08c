"""Outputs and cache files appear whole, with the mode any new file gets."""

import os
import stat

import pytest

from dalle2_cli.io.atomic import atomic_path


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_finished_file_has_the_mode_a_new_file_gets(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "image.png") as tmp:
            tmp.write_bytes(b"made")
        (tmp_path / "plain.txt").write_text("made")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "image.png").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~umask


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "image.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
