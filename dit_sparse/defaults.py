"""Generation defaults for the embedded tiny text-to-video model (read by the CLI)."""

from __future__ import annotations

from pathlib import Path


def _embedded_model() -> Path:
    """``dit_sparse/assets/tiny-t2v`` in an installed wheel, else the source tree's ``assets/tiny-t2v``."""
    here = Path(__file__).resolve().parent
    installed = here / "assets" / "tiny-t2v"
    return installed if (installed / "model_index.json").is_file() else here.parent / "assets" / "tiny-t2v"


#: The embedded model folder (Diffusers WanPipeline format), loaded with ``WanPipeline.from_pretrained``.
MODEL_PATH: Path = _embedded_model()
#: Sampling steps of the UniPC flow scheduler.
STEPS: int = 10
#: Frames (4k+1); 61 frames at 128x128 give 16 x 16 x 16 = 4096 video tokens.
FRAMES: int = 61
HEIGHT: int = 128
WIDTH: int = 128
#: Classifier-free guidance scale (1.0 turns CFG off and halves the work).
GUIDANCE: float = 1.0
#: Seed of the initial noise.
SEED: int = 0
#: Frames per second of written videos.
FPS: int = 16
#: A prompt the model knows (the caption grammar is in dit_sparse/train/data.py).
PROMPT: str = "a red circle moving right quickly on a black background"
