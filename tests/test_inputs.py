"""Input images and masks: formats, orientation, modes, squaring, masks, and every bad input.

The bad-input cases run the real `dalle2` command with a `torch` on the path that refuses to
be imported: each must be refused (exit 2, one line) before torch or a model is loaded. The
cases that generate images use the tiny models of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle2_cli.errors import InputError
from dalle2_cli.io.images import (
    MAX_PIXELS,
    fit_mask,
    fit_note,
    fit_square,
    grow_mask,
    open_image,
    open_mask,
)
from tests.helpers import run_cli

# -- helpers -----------------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and header claiming width x height, and no pixel data: what a
    decompression bomb looks like to a reader before it decodes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def _noise(path: Path, width: int = 32, height: int = 32, seed: int = 1) -> np.ndarray:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def _mask(path: Path, regenerate: np.ndarray) -> Path:
    Image.fromarray(regenerate.astype(np.uint8) * 255, "L").save(path)
    return path


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 40x20, left half red and right half blue, with EXIF orientation 6 (shown turned
    90° clockwise): upright it is 20x40, red on top."""
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste(Image.new("RGB", (20, 20), "red"), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


# -- reading images ----------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    _exif_rotated_jpeg(tmp_path / "photo.jpg")
    image = open_image(tmp_path / "photo.jpg")
    assert image.mode == "RGB" and image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp", "tiff", "bmp", "gif", "ppm", "ico"])
def test_any_format_pillow_reads(tmp_path, suffix):
    path = tmp_path / f"image.{suffix}"
    Image.new("RGB", (24, 24), (200, 40, 40)).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (24, 24)
    assert abs(int(np.asarray(image)[12, 12, 0]) - 200) < 16


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # transparent red: white
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black: grey
    rgba[1, 1] = (0, 255, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(open_image(tmp_path / "rgba.png")).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in pixels[1, 0])
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")  # black, fully transparent
    assert np.asarray(open_image(tmp_path / "la.png")).min() == 255


def test_grey_palette_and_one_bit_images(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "grey.png")
    assert np.asarray(open_image(tmp_path / "grey.png"))[1, 1].tolist() == [77, 77, 77]
    Image.new("1", (3, 3), 1).save(tmp_path / "bits.png")
    assert np.asarray(open_image(tmp_path / "bits.png")).min() == 255
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    assert np.asarray(open_image(tmp_path / "palette.png")).tolist() == [[[10, 20, 30], [200, 100, 0]]]
    palette.save(tmp_path / "transparent.png", transparency=0)  # colour 0 is transparent: white
    assert np.asarray(open_image(tmp_path / "transparent.png")).tolist() == [[[255, 255, 255], [200, 100, 0]]]


def test_sixteen_bit_and_float_images_use_their_full_range(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.asarray(open_image(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "float.tiff")
    assert np.asarray(open_image(tmp_path / "float.tiff"))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    image = open_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB" and np.asarray(image)[4, 4, 0] > 200


def test_too_many_pixels_are_refused_before_decoding(tmp_path):
    just_over = _png_header_only(tmp_path / "big.png", 10_000, MAX_PIXELS // 10_000 + 1)
    with pytest.raises(InputError, match=r"big.png \(10000x8948, 89 megapixels\) is over the limit"):
        open_image(just_over)
    # Far over: Pillow itself refuses to open it (its DecompressionBombError), still one line.
    with pytest.raises(InputError, match="bomb.png is over the limit of 89 megapixels"):
        open_image(_png_header_only(tmp_path / "bomb.png", 100_000, 100_000))


def test_unreadable_files(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not an image file Pillow can read"):
        open_image(tmp_path / "text.png")
    _noise(tmp_path / "noise.png", 64, 64)
    data = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # cut in the middle of the pixel data
    with pytest.raises(InputError, match=r"truncated \(an incomplete download or copy\?\)") as error:
        open_image(tmp_path / "cut.png")
    assert "\n" not in str(error.value)


# -- squaring ----------------------------------------------------------------------------------


def test_fit_square_crops_or_pads_with_white():
    wide = Image.new("RGB", (40, 30), (0, 0, 255))
    wide.paste(Image.new("RGB", (5, 30), (255, 0, 0)), (0, 0))  # a red band on the left edge
    cropped = np.asarray(fit_square(wide, 30))
    assert cropped.shape == (30, 30, 3) and (cropped[..., 0] < 50).all()  # the band is cut away
    padded = np.asarray(fit_square(wide, 32, pad=True))
    assert padded.shape == (32, 32, 3)
    assert (padded[:4] == 255).all() and (padded[-4:] == 255).all()  # white above and below
    assert padded[16, 0, 0] > 200 and padded[16, 16].tolist() == [0, 0, 255]  # all of the image is kept
    square = Image.new("RGB", (30, 30), "red")
    assert np.array_equal(np.asarray(fit_square(square, 30, pad=True)), np.asarray(fit_square(square, 30)))


def test_fit_mask_matches_the_image_and_never_loses_a_marked_area():
    regenerate = np.zeros((30, 40), dtype=bool)
    regenerate[10:20, 15:25] = True
    # The marked area in red on black: where the squared image is red, the squared mask marks.
    colours = np.where(regenerate[..., None], [255, 0, 0], [0, 0, 0]).astype(np.uint8)
    for pad in (False, True):
        fitted_image = np.asarray(fit_square(Image.fromarray(colours), 32, pad)).astype(int)
        fitted_mask = fit_mask(regenerate, 32, pad)
        red = (fitted_image[..., 0] > 100) & (fitted_image[..., 1] < 50)
        black = fitted_image.max(axis=-1) < 5
        assert fitted_mask[red].all() and not fitted_mask[black].any()
    padded = fit_mask(regenerate, 32, pad=True)
    assert not padded[:4].any() and not padded[-4:].any()
    speck = np.zeros((400, 400), dtype=bool)
    speck[123, 321] = True
    assert fit_mask(speck, 32).sum() >= 1


def test_fit_note_only_for_non_square_images():
    assert fit_note("a.png", Image.new("RGB", (8, 8))) is None
    assert fit_note("photo.jpg", Image.new("RGB", (640, 480))) == (
        "note: photo.jpg is 640x480; center-cropped to a square (--pad keeps all of it)"
    )
    assert fit_note("photo.jpg", Image.new("RGB", (640, 480)), pad=True) == (
        "note: photo.jpg is 640x480; padded to a square with white"
    )


# -- masks -------------------------------------------------------------------------------------


def test_mask_white_paints_black_keeps_grey_at_half(tmp_path):
    levels = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(levels, "L").save(tmp_path / "grey.png")
    assert open_mask(tmp_path / "grey.png", (4, 1), pad=True).tolist() == [[False, False, True, True]]
    Image.fromarray(np.stack([levels] * 3, axis=-1), "RGB").save(tmp_path / "rgb.png")
    assert open_mask(tmp_path / "rgb.png", (4, 1), pad=True).tolist() == [[False, False, True, True]]
    deep = np.array([[0, 20000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert open_mask(tmp_path / "deep.png", (4, 1), pad=True).tolist() == [[False, False, True, True]]


def test_mask_transparency_paints_whatever_the_colour(tmp_path):
    rgba = np.full((1, 4, 4), 255, dtype=np.uint8)  # opaque white everywhere ...
    rgba[0, :2, 3] = 0  # ... but the first two pixels are transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert open_mask(tmp_path / "alpha.png", (4, 1), pad=True).tolist() == [[True, True, False, False]]
    rgba[0, :, 3] = 255  # fully opaque: the colours decide
    rgba[0, 2:, :3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    assert open_mask(tmp_path / "opaque.png", (4, 1), pad=True).tolist() == [[True, True, False, False]]


def test_mask_of_an_exif_rotated_image_is_matched_upright(tmp_path):
    _exif_rotated_jpeg(tmp_path / "photo.jpg")
    image = open_image(tmp_path / "photo.jpg")
    upright = np.zeros((40, 20), dtype=bool)
    upright[:10] = True
    assert np.array_equal(open_mask(_mask(tmp_path / "m.png", upright), image.size, pad=True), upright)
    with pytest.raises(InputError, match=r"is 40x20 but the image is 20x40 \(rotated\?"):
        open_mask(_mask(tmp_path / "stored.png", upright.T), image.size)


def _disc_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """Slow and obviously right: every pixel within `radius` of a marked one."""
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    out = np.zeros_like(mask)
    for y, x in zip(ys, xs, strict=True):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius
    return out


def test_grow_mask_is_a_disc_dilation():
    dot = np.zeros((11, 11), dtype=bool)
    dot[5, 5] = True
    assert grow_mask(dot, 2).sum() == 13  # the radius-2 disc
    rng = np.random.default_rng(0)
    for radius in (1, 3, 7):
        mask = rng.random((23, 31)) > 0.97
        assert np.array_equal(grow_mask(mask, radius), _disc_dilation(mask, radius))
    corner = np.zeros((40, 50), dtype=bool)  # only the box around the marks is worked on
    corner[1, 47] = corner[3, 45] = True
    assert np.array_equal(grow_mask(corner, 5), _disc_dilation(corner, 5))
    assert np.array_equal(grow_mask(dot, 0), dot)
    with pytest.raises(InputError, match="mask_grow must be 0 or more"):
        grow_mask(dot, -1)


def test_open_mask_grows_and_refuses_what_leaves_nothing_to_keep(tmp_path):
    regenerate = np.zeros((20, 20), dtype=bool)
    regenerate[8:12, 8:12] = True
    path = _mask(tmp_path / "m.png", regenerate)
    assert np.array_equal(open_mask(path, (20, 20), grow=3), _disc_dilation(regenerate, 3))
    with pytest.raises(InputError, match="whole image to regenerate once grown by 30 pixels: .* grow it less"):
        open_mask(path, (20, 20), grow=30)


def test_center_crop_must_leave_something_to_regenerate_and_to_keep(tmp_path):
    edge = np.zeros((30, 40), dtype=bool)
    edge[:, :3] = True  # only in the band that center-cropping cuts away
    with pytest.raises(InputError, match="only areas outside the 40x30 image's center square.*pad=True"):
        open_mask(_mask(tmp_path / "edge.png", edge), (40, 30))
    assert open_mask(tmp_path / "edge.png", (40, 30), pad=True).sum() == 90
    middle = np.zeros((30, 40), dtype=bool)
    middle[:, 4:36] = True  # all of the center square, but not the sides
    with pytest.raises(InputError, match="all of the 40x30 image's center square.*pad=True"):
        open_mask(_mask(tmp_path / "middle.png", middle), (40, 30))
    assert open_mask(tmp_path / "middle.png", (40, 30), pad=True).sum() == 32 * 30


# -- bad inputs through the real CLI, before torch ---------------------------------------------


@pytest.fixture
def no_torch(tmp_path) -> dict[str, str]:
    """An environment in which importing torch (or dalle2_pytorch) fails loudly."""
    fake = tmp_path / "no-torch"
    for name in ("torch", "dalle2_pytorch"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} imported before the inputs were checked')")
    path = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def _write_bad_inputs(tmp: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp / "img.png")
    Image.new("RGB", (40, 30), "red").save(tmp / "wide.png")
    Image.new("L", (16, 16), 255).save(tmp / "small-mask.png")
    Image.new("L", (32, 32), 0).save(tmp / "black.png")
    Image.new("L", (32, 32), 255).save(tmp / "white.png")
    dot = np.zeros((32, 32), dtype=bool)
    dot[10:14, 10:14] = True
    _mask(tmp / "dot.png", dot)
    edge = np.zeros((30, 40), dtype=bool)
    edge[:, :3] = True
    _mask(tmp / "edge.png", edge)
    (tmp / "text.png").write_text("not an image")
    (tmp / "header.png").write_bytes((tmp / "img.png").read_bytes()[:60])
    _noise(tmp / "noise.png", 64, 64)
    data = (tmp / "noise.png").read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    _png_header_only(tmp / "huge.png", 12_000, 12_000)
    _png_header_only(tmp / "bomb.png", 100_000, 100_000)
    (tmp / "adir").mkdir()
    (tmp / "a-file").write_text("a file where the output directory should go")


# Each case: the command line (run in the directory _write_bad_inputs filled), and what its one
# error line must say.
OUT = ["-o", "out"]
BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "empty prompt": (["text2im", " ", *OUT], "a prompt is empty"),
    "one of the prompts empty": (["text2im", "a cat", "", *OUT], "a prompt is empty"),
    "empty inpaint prompt": (["inpaint", "img.png", "dot.png", "  ", *OUT], "the prompt is empty"),
    "empty variation text": (["variation", "img.png", "--text", "", *OUT], "--text is empty"),
    "zero images": (["text2im", "x", "-n", "0", *OUT], "--num-images must be at least 1, got 0"),
    "zero batch": (["text2im", "x", "--batch-size", "0", *OUT], "--batch-size must be at least 1"),
    "negative prior steps": (["text2im", "x", "--prior-steps", "-2", *OUT], "--prior-steps must be at least 1"),
    "negative decoder steps": (["variation", "img.png", "--decoder-steps", "-5", *OUT], "must be at least 1, got -5"),
    "steps not numbers": (["text2im", "x", "--decoder-steps", "a,b", *OUT], "expects whole numbers"),
    "nan guidance": (["text2im", "x", "--decoder-cond-scale", "nan", *OUT], "--decoder-cond-scale must be a finite"),
    "inf prior guidance": (["text2im", "x", "--prior-cond-scale", "inf", *OUT], "must be a finite number, got inf"),
    "a billion images": (["text2im", "x", "-n", "1000000000", *OUT], "--num-images must be at most 100,000"),
    "zero threads": (["text2im", "x", "--threads", "0", *OUT], "--threads must be at least 1"),
    "wrong case config": (["text2im", "x", "-c", "LAION-1.5b", *OUT], "did you mean 'laion-1.5B'?"),
    "unknown config": (["text2im", "x", "-c", "no-such-config", *OUT], "unknown config 'no-such-config'"),
    "missing image": (["variation", "nope.png", *OUT], "image not found: nope.png"),
    "missing second image": (["variation", "img.png", "nope.png", *OUT], "image not found: nope.png"),
    "missing mask": (["inpaint", "img.png", "nope.png", *OUT], "mask not found: nope.png"),
    "directory image": (["variation", "adir", *OUT], "image adir is a directory, not an image file"),
    "device file": (["variation", "/dev/null", *OUT], "image /dev/null is not a regular file"),
    "directory mask": (["inpaint", "img.png", "adir", *OUT], "mask adir is a directory, not an image file"),
    "not an image": (["variation", "text.png", *OUT], "text.png is not an image file Pillow can read"),
    "mask not an image": (["inpaint", "img.png", "text.png", *OUT], "not an image file Pillow can read"),
    "truncated png": (["variation", "truncated.png", *OUT], "truncated"),
    "png cut in its header": (["inpaint", "header.png", "dot.png", *OUT], "cannot read image header.png"),
    "too many pixels": (["variation", "huge.png", *OUT], "(12000x12000, 144 megapixels) is over the limit"),
    "decompression bomb": (["inpaint", "bomb.png", "img.png", *OUT], "over the limit of 89 megapixels"),
    "mask size": (["inpaint", "img.png", "small-mask.png", *OUT], "16x16 but the image is 32x32"),
    "all-black mask": (["inpaint", "img.png", "black.png", *OUT], "marks nothing to regenerate"),
    "all-white mask": (["inpaint", "img.png", "white.png", *OUT], "whole image to regenerate"),
    "mask grown over everything": (
        ["inpaint", "img.png", "dot.png", "--mask-grow", "40", *OUT],
        "once grown by 40 pixels",
    ),
    "negative mask grow": (
        ["inpaint", "img.png", "dot.png", "--mask-grow", "-1", *OUT],
        "--mask-grow must be 0 or more pixels, got -1",
    ),
    "mask outside the center square": (["inpaint", "wide.png", "edge.png", *OUT], "pass --pad"),
    "output is a file": (["text2im", "x", "-o", "a-file"], "is a file: pass another --output-dir"),
    "output inside a file": (
        ["inpaint", "img.png", "dot.png", "-o", "a-file/out"],
        "cannot create output directory a-file/out",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_before_torch(tmp_path, no_torch, case):
    _write_bad_inputs(tmp_path)
    args, expected = BAD_INPUTS[case]
    if "-c" not in args:
        args = [*args, "-c", "shapes"]  # the shipped config: its models are never loaded here
    result = run_cli(*args, cwd=tmp_path, env=no_torch)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "imported before" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()  # refused before the output directory was made


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path, no_torch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for target in (locked, locked / "out"):
            result = run_cli("text2im", "x", "-c", "shapes", "-o", str(target), cwd=tmp_path, env=no_torch)
            assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
            assert "--output-dir" in result.stderr
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_unwritable_output_directory_as_the_cli_sees_it(tmp_path, monkeypatch):
    """As root every directory is writable: make os.access say no, in process."""
    from typer.testing import CliRunner

    from dalle2_cli.cli import app
    from dalle2_cli.io import output

    class ReadOnlyOs:  # the os module as the generating commands see it, but nothing is writable
        def __getattr__(self, name: str):
            return getattr(os, name)

        @staticmethod
        def access(*args, **kwargs) -> bool:
            return False

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(output, "os", ReadOnlyOs())
    result = CliRunner().invoke(app, ["text2im", "x", "-c", "shapes", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "output directory" in result.output and "is not writable: pass another --output-dir" in result.output


# -- generating from awkward inputs, with the tiny models ---------------------------------------


def _generate(*args: str, cwd: Path) -> tuple[list[dict], list[str]]:
    result = run_cli(*args, "--json", cwd=cwd, check=True)
    return json.loads(result.stdout)["images"], result.stderr.splitlines()


def test_variation_of_every_kind_of_image(tiny_config, tmp_path):
    _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    Image.new("L", (32, 32), 90).save(tmp_path / "grey.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sticker.png")
    Image.new("RGB", (32, 32), "green").convert("P").save(tmp_path / "palette.gif")
    Image.new("RGB", (32, 32), "yellow").save(tmp_path / "photo.webp")
    names = ["rotated.jpg", "grey.png", "deep.png", "sticker.png", "palette.gif", "photo.webp"]
    images, stderr = _generate("variation", *names, "-c", str(tiny_config), "--seed", "2", cwd=tmp_path)
    assert [Path(i["source"]).name for i in images] == names
    assert all((i["width"], i["height"]) == (32, 32) for i in images)
    notes = [line for line in stderr if line.startswith("note:")]
    assert notes == ["note: rotated.jpg is 20x40; center-cropped to a square (--pad keeps all of it)"]


def test_inpaint_non_square_crops_or_pads_image_and_mask_alike(tiny_config, tmp_path):
    original = _noise(tmp_path / "wide.png", 40, 30)
    regenerate = np.zeros((30, 40), dtype=bool)
    regenerate[10:20, 12:28] = True
    _mask(tmp_path / "mask.png", regenerate)
    picture = Image.fromarray(original)
    for pad in (False, True):
        flags = ["--pad"] if pad else []
        images, stderr = _generate(
            "inpaint", "wide.png", "mask.png", "a dog", "-c", str(tiny_config), "--seed", "5", *flags, cwd=tmp_path
        )
        how = "padded to a square with white" if pad else "center-cropped to a square (--pad keeps all of it)"
        assert [line for line in stderr if line.startswith("note:")] == [f"note: wide.png is 40x30; {how}"]
        output = np.asarray(Image.open(tmp_path / images[0]["path"]))
        expected = np.asarray(fit_square(picture, 32, pad))
        keep = ~fit_mask(regenerate, 32, pad)
        if pad:  # the white bands that padded the image to a square are cropped off again
            assert output.shape == (24, 32, 3) and (images[0]["width"], images[0]["height"]) == (32, 24)
            expected, keep = expected[4:28], keep[4:28]
        assert np.array_equal(output[keep], expected[keep])
        assert (output[~keep] != expected[~keep]).any()


def test_inpaint_mask_grow_regenerates_a_wider_area(tiny_config, tmp_path):
    original = _noise(tmp_path / "photo.png")
    regenerate = np.zeros((32, 32), dtype=bool)
    regenerate[12:18, 12:18] = True
    _mask(tmp_path / "mask.png", regenerate)
    images, _ = _generate(
        "inpaint", "photo.png", "mask.png", "-c", str(tiny_config), "--seed", "6", "--mask-grow", "4", cwd=tmp_path
    )
    output = np.asarray(Image.open(tmp_path / images[0]["path"]))
    grown = grow_mask(regenerate, 4)
    assert np.array_equal(output[~grown], original[~grown])  # kept exactly outside the grown area
    ring = grown & ~regenerate
    assert (output[ring] != original[ring]).any()  # the added ring was regenerated too


def test_a_sliver_padded_keeps_one_row_of_pixels(tiny_config, tmp_path):
    """A 20000x10 image at 64 px is 64x1 padded, not a crash ("height and width must be > 0")."""
    from dalle2_cli.sampling.pipelines import padded_box

    sliver = Image.new("RGB", (20000, 10), (200, 30, 30))
    square = np.asarray(fit_square(sliver, 64, pad=True)).astype(int)
    assert (square[32] == (200, 30, 30)).all() and (np.delete(square, 32, axis=0) == 255).all()
    assert padded_box((20000, 10), 64) == (0, 32, 64, 33) and padded_box((10, 20000), 64) == (32, 0, 33, 64)
    assert fit_mask(np.ones((10, 20000), dtype=bool), 64, pad=True).sum() == 64  # the padding is kept
    sliver.save(tmp_path / "wide.png")
    result = run_cli("variation", "wide.png", "--pad", "-c", str(tiny_config), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["images"][0]["width"] == 32
