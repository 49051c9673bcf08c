"""Write the shipped `tiny-random` model: random weights in real checkpoint formats.

It makes noise, not pictures: it exists so that every code path (config, two-file decoder,
CLIP from a file, the three commands) runs offline on a fresh install in seconds.

    python scripts/make_tiny_random.py
"""

from pathlib import Path

from dalle2_cli.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    config = write_tiny_model(
        ROOT / "dalle2_cli" / "weights" / "tiny-random",
        layout="tracker",
        seed=0,
        path_prefix="package://weights/tiny-random/",
        config_path=ROOT / "configs" / "tiny-random.json",
    )
    print(f"wrote {config}")
