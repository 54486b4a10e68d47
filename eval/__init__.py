"""Quality-vs-speed evaluation: PSNR/SSIM/LPIPS against the dense video, runs, plots and side-by-side videos.

``dit_sparse.eval.run(model=..., methods=[...], prompts=..., seeds=..., out=...)`` is ``dit-sparse eval``.
"""

from dit_sparse.eval.generation import generate
from dit_sparse.eval.metrics import LPIPS, psnr, ssim
from dit_sparse.eval.report import summarize
from dit_sparse.eval.run import run
from dit_sparse.eval.settings import load_pipeline
from dit_sparse.eval.specs import parse_methods
from dit_sparse.eval.store import RunFolderBusy

__all__ = ["LPIPS", "RunFolderBusy", "generate", "load_pipeline", "parse_methods", "psnr", "run", "ssim", "summarize"]
