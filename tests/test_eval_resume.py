"""``dit_sparse.eval.run`` never loses or mislabels a row: reruns with another dtype, a crash mid-write, a busy
folder, long alike labels; bad arguments are refused before the model is loaded."""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from dit_sparse.eval.run import RunFolderBusy, run
from dit_sparse.eval.specs import MethodSpec
from dit_sparse.eval.store import RunLock

GEN = {"steps": 2, "frames": 9, "height": 64, "width": 64, "guidance": 5.0, "max_sequence_length": 16}
SMALL = {"block_size": 4, "min_seq_len": 0}
PROMPT = ["a red circle moving right"]
quick = partial(run, prompts=PROMPT, seeds=[0], lpips=False, videos=False, error_sample=0, progress=False, **GEN)


@pytest.fixture(scope="module")
def tiny_pipe():  # noqa: ANN201
    from dit_sparse.eval.testing import tiny_random_wan_pipeline

    return tiny_random_wan_pipeline()


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The generations ``run`` makes, by method (``native``: the model's own attention)."""
    run_mod = sys.modules["dit_sparse.eval.run"]
    calls: list[str] = []
    real = run_mod.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("method") or "native")
        return real(*args, **kwargs)

    monkeypatch.setattr(run_mod, "generate", counting)
    return calls


def _lines(path: Path) -> list[Any]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_rerun_in_another_dtype_is_not_taken_for_the_first(tmp_path: Path, tiny_pipe, generations) -> None:  # noqa: ANN001
    from dit_sparse.eval.testing import tiny_random_wan_pipeline

    out = tmp_path / "run"
    first = quick(tiny_pipe, [("dense", SMALL)], out=out)
    assert [r["dtype"] for r in first] == ["float32"]
    generations.clear()
    bf16 = tiny_random_wan_pipeline().to(torch.bfloat16)
    rows = quick(bf16, [("dense", SMALL)], out=out)
    assert "dense" in generations  # generated anew, not resumed from the float32 row
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert [r["dtype"] for r in _lines(out / "results.jsonl")] == ["float32", "bfloat16"]
    generations.clear()
    assert len(quick(bf16, [("dense", SMALL)], out=out)) == 2 and generations == []  # its own row: resumed


def test_a_rerun_after_a_crash_mid_write_keeps_every_row(tmp_path: Path, tiny_pipe) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    quick(tiny_pipe, [("dense", SMALL)], out=out)
    with (out / "results.jsonl").open("a") as f:
        f.write('{"label": "window:block_size=4;min_seq_len=0;window=0,0,0", "psnr": 3')  # cut short
    rows = quick(tiny_pipe, [("dense", SMALL), "window:window=0,0,0;tile=1,2,2;block_size=4;min_seq_len=0"], out=out)
    assert [r["method"] for r in rows] == ["dense", "window"]
    assert [r["method"] for r in _lines(out / "results.jsonl")] == ["dense", "window"]  # every line a whole row


def test_lines_that_are_not_rows_do_not_stop_a_run(tmp_path: Path, tiny_pipe) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    quick(tiny_pipe, [("dense", SMALL)], out=out)
    with (out / "results.jsonl").open("a") as f:
        f.write("{}\nnull\n[1]\n")
    printed: list[str] = []
    rows = quick(tiny_pipe, [("dense", SMALL)], out=out, log=printed.append)
    assert [r["method"] for r in rows] == ["dense"]
    warned = [p for p in printed if p.startswith("warning:")]
    assert [w.split(": ")[1] for w in warned] == [f"{out / 'results.jsonl'}:{n}" for n in (2, 3, 4)]


def test_a_second_run_on_a_busy_folder_is_refused_at_once(tmp_path: Path, tiny_pipe, generations) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    with RunLock(out), pytest.raises(RunFolderBusy, match=rf"run folder .*{out.name}.* is busy"):
        quick(tiny_pipe, [("dense", SMALL)], out=out)
    assert generations == [] and not (out / "results.jsonl").exists()
    assert len(quick(tiny_pipe, [("dense", SMALL)], out=out)) == 1  # the lock is released after a run


def test_long_alike_labels_give_distinct_videos(tmp_path: Path, tiny_pipe) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    long = "dense with a long descriptive label that goes on beyond sixty characters, variant "
    specs = [MethodSpec(long + "A", "dense", SMALL), MethodSpec(long + "B", "dense", SMALL)]
    rows = quick(tiny_pipe, specs, out=out, videos=True)
    assert len({r["video"] for r in rows}) == 2
    assert len(list((out / "videos").iterdir())) == 2


@pytest.fixture
def model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that passes for a pipeline; loading it fails the test (arguments are checked before loading)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(sys.modules["dit_sparse.eval.run"], "load_pipeline", never)
    return folder


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"error_sample": -1}, "error_sample must be an integer >= 0"),
        ({"error_sample": 1.5}, "error_sample must be an integer >= 0"),
        ({"error_sample": "2"}, "error_sample must be an integer >= 0"),
        ({"methods": []}, "no methods given"),
        ({"methods": ""}, "no methods given"),
        ({"seeds": []}, "no seeds given"),
        ({"seeds": [-1]}, "bad seed -1"),
        ({"seeds": [0.5]}, "bad seed 0.5"),
        ({"seeds": [True]}, "bad seed True"),
        ({"seeds": "0,1"}, "seeds must be a list of integers"),
        ({"seeds": [3, 3]}, "seed 3 given twice"),
        ({"dtype": "float33"}, "unknown dtype 'float33'; choose one of float32"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"device": "cuda:99"}, "device 'cuda:99'"),
        ({"backend": "fast"}, "unknown attention backend 'fast'"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"frames": 2.5}, "frames must be a positive integer"),
        ({"guidance": math.inf}, "guidance must be a finite number"),
        ({"amplify": 0}, "amplify must be a finite number > 0"),
        ({"prompts": []}, "no prompts given"),
        ({"prompts": ["  "]}, "a prompt is empty"),
        ({"lpips": "yes"}, "lpips must be True, False or an LPIPS instance"),
        ({"out": "FILE/o"}, "is a file, not a folder"),
    ],
)
def test_bad_arguments_are_refused_before_loading(
    tmp_path: Path, model_folder: Path, bad: dict[str, Any], message: str
) -> None:
    (tmp_path / "FILE").write_text("")
    args = {"model": model_folder, "methods": ["dense"], "prompts": PROMPT, "seeds": [0], "out": tmp_path / "o"}
    if "out" in bad:
        bad = {"out": tmp_path / bad["out"]}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run(**{**args, **bad}, progress=False)
    assert not (tmp_path / "o").exists()


def test_device_and_dtype_with_a_built_pipeline_are_refused(tmp_path: Path, tiny_pipe) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="device and dtype are for a pipeline loaded from a folder"):
        quick(tiny_pipe, ["dense"], out=tmp_path / "o", dtype="bfloat16")
