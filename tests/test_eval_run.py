"""``dit_sparse.eval.run`` on a tiny random Wan pipeline: every output file, resume, dense cache, method parsing."""

from __future__ import annotations

import csv
import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_sparse.eval.metrics import caption_ok
from dit_sparse.eval.report import format_table, summarize
from dit_sparse.eval.settings import read_prompts
from dit_sparse.eval.specs import MethodSpec, parse_methods, split_method_list
from dit_sparse.eval.store import DenseCache

SMALL = {"tile": (1, 2, 2), "block_size": 4, "min_seq_len": 0}  # 64×64×9 frames → 3×4×4 = 48 video tokens
GEN = {"steps": 2, "frames": 9, "height": 64, "width": 64, "guidance": 5.0, "max_sequence_length": 16}


def test_split_method_list() -> None:
    assert split_method_list("dense,window:window=1,1,1,radial") == ["dense", "window:window=1,1,1", "radial"]
    assert split_method_list("window:window=1,1,1,tile=2,8,8, radial:decay=0.2") == [
        "window:window=1,1,1;tile=2,8,8",
        "radial:decay=0.2",
    ]
    assert split_method_list("window:window=1,1,1;tile=2,8,8") == ["window:window=1,1,1;tile=2,8,8"]


def test_parse_methods_labels_params_and_errors() -> None:
    specs = parse_methods(
        "dense,window:window=0,0,0", params={"window": {"tile": (1, 2, 2)}}, common={"block_size": 4, "min_seq_len": 0}
    )
    assert specs[0] == MethodSpec("dense:block_size=4;min_seq_len=0", "dense", {"block_size": 4, "min_seq_len": 0})
    assert specs[1].params == {"block_size": 4, "min_seq_len": 0, "tile": (1, 2, 2), "window": (0, 0, 0)}
    assert specs[1].label == "window:block_size=4;min_seq_len=0;tile=1,2,2;window=0,0,0"
    assert parse_methods([("window", SMALL)])[0].params == SMALL
    with pytest.raises(ValueError, match="known methods: .*window"):
        parse_methods("nosuch")
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        parse_methods("window:nope=1")
    with pytest.raises(ValueError, match="given twice"):
        parse_methods("window,window")


def test_read_prompts(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red circle moving right\n\n a blue square moving left \n")
    assert read_prompts(f) == ["a red circle moving right", "a blue square moving left"]
    assert len(read_prompts("builtin")) >= 1
    with pytest.raises(FileNotFoundError, match="prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_dense_cache_roundtrip(tmp_path: Path) -> None:
    cache = DenseCache(tmp_path)
    meta = {"prompt": "p", "seed": 0}
    assert cache.get(meta) is None
    video = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    cache.put(meta, video, {"seconds": 1.0})
    got = cache.get(meta)
    assert got is not None and np.array_equal(got[0], video) and got[1]["seconds"] == 1.0
    assert cache.get({"prompt": "p", "seed": 1}) is None


def test_summary_table_handles_inf_and_missing() -> None:
    rows = [
        {"label": "dense", "psnr": "inf", "ssim": 1.0, "lpips": None, "speedup": 1.0},
        {"label": "w", "psnr": 30.0, "ssim": 0.9, "lpips": None, "speedup": 2.0},
        {"label": "w", "psnr": 32.0, "ssim": 0.95, "lpips": None, "speedup": 2.2},
    ]
    s = summarize(rows)
    assert s[0]["psnr"] == math.inf and s[1]["psnr"] == pytest.approx(31.0) and s[1]["videos"] == 2
    table = format_table(s)
    assert "inf" in table and "n/a" in table and "31.00" in table


def test_caption_ok_checks_the_embedded_grammar() -> None:
    from dit_sparse.train.data import batch

    videos, captions = batch(5, 2, 29, 64, 64, two_prob=0.0)
    for video, caption in zip(videos, captions, strict=True):
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        assert caption_ok(frames, caption) is True
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        assert caption_ok(frames, " ".join(opposite.get(w, w) for w in caption.split())) is False
        assert caption_ok(frames, "a photo of a cat") is None
    s = summarize([{"label": "m", "caption_ok": True}, {"label": "m", "caption_ok": False}])
    assert s[0]["caption_ok"] == pytest.approx(0.5) and "0.50" in format_table(s)


@pytest.fixture(scope="module")
def tiny_pipe():  # noqa: ANN201
    from dit_sparse.eval.testing import tiny_random_wan_pipeline

    return tiny_random_wan_pipeline()


def test_run_writes_everything_and_resumes(tmp_path: Path, tiny_pipe, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    from dit_sparse.eval import LPIPS, run

    run_mod = sys.modules["dit_sparse.eval.run"]
    out = tmp_path / "run"
    methods = ["dense", "window:window=0,0,0"]
    common = {"block_size": 4, "min_seq_len": 0}
    params = {"window": {"tile": (1, 2, 2)}}
    lp = LPIPS(model=lambda x, y: ((x - y) ** 2).mean(dim=(1, 2, 3)))  # a stand-in distance: the path is tested
    run_all = partial(
        run,
        tiny_pipe,
        methods,
        ["a red circle moving right"],
        [0],
        out,
        params=params,
        common_params=common,
        lpips=lp,
        progress=False,
        **GEN,
    )
    rows = run_all()
    assert len(rows) == 2
    for name in ("results.jsonl", "results.csv", "pareto.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vids = sorted((out / "videos").iterdir())
    assert len(vids) == 2 and all(v.suffix in (".mp4", ".gif") and v.stat().st_size > 0 for v in vids)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    dense_row, win_row = lines
    # the `dense` method through the sparse machinery reproduces the model's own attention
    assert float(dense_row["psnr"]) > 40 and dense_row["ssim"] > 0.99
    assert win_row["method"] == "window" and win_row["sparse_calls"] > 0
    assert 0 < win_row["density"] < 1
    for key in (
        "ssim",
        "lpips",
        "transformer_ms_per_step",
        "dense_transformer_ms_per_step",
        "speedup",
        "attention_ms_per_step",
        "attn_out_rel_l2",
        "effective_density",
    ):
        assert isinstance(win_row[key], float), key
    assert win_row["lpips_status"] == "ok" and win_row["attn_out_rel_l2"] > 0
    assert win_row["caption_ok"] is None  # a random pipeline: the caption check is the embedded model's only
    assert win_row["video"].startswith("videos/")
    with (out / "results.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [dense_row["label"], win_row["label"]]
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "speedup" in printed and win_row["label"] in printed

    # a second run: finished rows are skipped, no generation at all
    calls: list[str] = []
    real_generate = run_mod.generate

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(kwargs.get("method") or "native")
        return real_generate(*args, **kwargs)

    run_mod.generate = counting
    try:
        again = run_all()  # the same run again: every row is resumed, nothing generated
        assert calls == [] and len(again) == 2
        assert "resuming: 2 of 2 rows" in capsys.readouterr().out
        # a lost row is redone; its dense reference comes from the cache (dense is generated again only for timing)
        (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")  # drop a row
        calls.clear()
        rows3 = run(
            tiny_pipe,
            methods,
            ["a red circle moving right"],
            [0],
            out,
            params=params,
            common_params=common,
            lpips=False,
            videos=False,
            error_sample=0,
            progress=False,
            **GEN,
        )
        # warm-up (native), dense timing (native, reference came from the cache), then the missing window row
        assert calls == ["native", "native", "window"]
        assert len(rows3) == 2 and rows3[1]["lpips"] is None and rows3[1]["lpips_status"] == "skipped"
    finally:
        run_mod.generate = real_generate


def test_run_on_embedded_model_when_present(tmp_path: Path) -> None:
    """The embedded tiny model (assets/tiny-t2v) through the default path: no --model, its defaults, fewer steps."""
    from dit_sparse.eval.run import run
    from dit_sparse.eval.settings import default_model_path

    path = default_model_path()
    if path is None or not (path / "model_index.json").is_file():
        pytest.skip("the embedded tiny model is not in assets/ yet")
    rows = run(
        None,
        ["dense:min_seq_len=0", "window:window=0,0,0;min_seq_len=0"],
        ["builtin"][0],
        [0],
        tmp_path / "run",
        steps=2,
        frames=9,
        height=64,
        width=64,
        error_sample=0,
        lpips=False,
        videos=False,
        progress=False,
    )
    assert len(rows) == 8
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(float(r["psnr"]) > 35 for r in dense)


def test_results_survive_a_cut_line(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial last line: the finished rows load, the cut one is redone."""
    from dit_sparse.eval.store import append_row, load_rows

    path = tmp_path / "results.jsonl"
    append_row(path, {"label": "a", "psnr": math.inf})
    with path.open("a") as f:
        f.write('{"label": "b", "ps')
    rows = load_rows(path, warn=lambda message: None)
    assert rows == [{"label": "a", "psnr": "inf"}]
