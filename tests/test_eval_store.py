"""``dit_sparse.eval.store``: the rows file survives cut and foreign lines, rows are keyed by every setting, one run
holds a folder at a time, video names never collide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit_sparse.eval.store import (
    RunFolderBusy,
    RunLock,
    append_row,
    load_rows,
    repair_tail,
    row_key,
    satisfies,
    video_name,
)


def _collect() -> tuple[list[str], object]:
    seen: list[str] = []
    return seen, seen.append


def test_a_row_appended_after_a_cut_line_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, {"label": "a"})
    with path.open("a") as f:
        f.write('{"label": "b", "ps')  # a crash mid-write
    append_row(path, {"label": "c"})
    seen, warn = _collect()
    assert load_rows(path, warn) == [{"label": "a"}, {"label": "c"}]
    assert len(seen) == 1 and f"{path}:2:" in seen[0]


def test_repair_tail_removes_a_cut_line_and_keeps_a_whole_one(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, {"label": "a"})
    with path.open("a") as f:
        f.write('{"label": "b", "ps')
    note = repair_tail(path)
    assert note is not None and "incomplete last line" in note
    assert path.read_text() == '{"label": "a"}\n'
    with path.open("a") as f:
        f.write('{"label": "b"}')  # whole, only its newline missing
    assert repair_tail(path) is None
    assert path.read_text() == '{"label": "a"}\n{"label": "b"}\n'
    assert repair_tail(path) is None and repair_tail(tmp_path / "missing.jsonl") is None


def test_lines_that_are_not_rows_are_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"label": "a"}\n{}\nnull\n[1, 2]\n"text"\n3\nnot json\n\n{"label": "b"}\n')
    seen, warn = _collect()
    assert load_rows(path, warn) == [{"label": "a"}, {"label": "b"}]
    assert [w.split(": ", 1)[0] for w in seen] == [f"{path}:{n}" for n in range(2, 8)]
    with pytest.warns(UserWarning) as record:  # the default: Python warnings
        load_rows(path)
    assert [str(w.message) for w in record] == seen


def _row(**changes: object) -> dict[str, object]:
    row = {
        "model_id": "m",
        "fingerprint": "f",
        "prompt": "p",
        "seed": 0,
        "label": "window",
        "method": "window",
        "params": {},
        "settings": {"steps": 2},
        "dtype": "float32",
        "device": "cuda:0",
        "device_name": "H200",
        "backend": "auto",
        "error_sample": 1,
        "psnr": 30.0,
    }
    return {**row, **changes}


def test_row_key_holds_every_setting_that_changes_the_result() -> None:
    base = row_key(_row())
    for change in (
        {"dtype": "bfloat16"},
        {"device": "cpu"},
        {"device_name": "A100"},
        {"backend": "flex"},
        {"fingerprint": "g"},
        {"model_id": "n"},
        {"params": {"decay": 0.2}},
        {"settings": {"steps": 3}},
        {"prompt": "q"},
        {"seed": 1},
        {"label": "w2"},
    ):
        assert row_key(_row(**change)) != base, change
    assert row_key(_row(device="cuda:1", psnr=1.0)) == base  # the same GPU model, another index; results don't count
    assert satisfies(_row(), 1) and satisfies(_row(), 0)  # a run without error sampling takes a row that has it
    assert not satisfies(_row(), 2) and not satisfies(_row(error_sample=0), 1) and not satisfies({"label": "x"}, 0)


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy, match=rf"{tmp_path.name}.* is busy.*pid {os.getpid()}") as e:
            RunLock(tmp_path).__enter__()
        assert "\n" not in str(e.value)
        other = subprocess.run(  # another process: flock is per open file, so this is the real case
            [
                sys.executable,
                "-c",
                f"from dit_sparse.eval.store import RunLock; RunLock({str(tmp_path)!r}).__enter__()",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode != 0 and "RunFolderBusy" in other.stderr and "is busy" in other.stderr
    with RunLock(tmp_path):  # released: free again
        pass


def test_video_names_are_distinct_for_long_alike_labels() -> None:
    prompt = "a red circle moving right quickly on a black background"
    a = "window:" + "block_size=4;" * 8 + "window=0,0,0"
    b = "window:" + "block_size=4;" * 8 + "window=1,1,1"
    names = {video_name(prompt, label, row_key(_row(label=label))) for label in (a, b)}
    assert len(names) == 2 and all(n.endswith(".mp4") and len(n) < 120 for n in names)
    same = row_key(_row(label=a))
    assert video_name(prompt, a, same) == video_name(prompt, a, same)
    assert video_name(prompt, a, same) != video_name(prompt, a, row_key(_row(label=a, dtype="bfloat16")))
