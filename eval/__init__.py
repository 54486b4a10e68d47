"""Quality-vs-speed evaluation: PSNR/SSIM/LPIPS against the dense video, runs, plots and side-by-side videos.

``dit_sparse.eval.run(model=..., methods=[...], prompts=..., seeds=..., out=...)`` is ``dit-sparse eval``.
"""

from dit_sparse.eval.metrics import LPIPS, psnr, ssim
from dit_sparse.eval.run import generate, load_pipeline, parse_methods, run, summarize

__all__ = ["LPIPS", "generate", "load_pipeline", "parse_methods", "psnr", "run", "ssim", "summarize"]
