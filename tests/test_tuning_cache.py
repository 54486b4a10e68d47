"""The tuning file: a persistent tuner's result is read back by a fresh one without timing; corrupt files, files of
another machine stamp, unknown config names and malformed entries are ignored with a warning naming the file; the
env var moves or disables the cache; writers merge; keys keep their types."""

from __future__ import annotations

import json
import warnings
from typing import NamedTuple

import pytest

from dit_sparse.kernels import tuning_cache as tc
from dit_sparse.kernels.tuning import Tuner

STAMP = {"gpu": "Test GPU", "cuda_driver": 12080, "torch": "2.13.0", "triton": "3.9.0", "dit_sparse": "0.1.0"}
SPEEDS = {"a": 3.0, "b": 1.0, "c": 2.0}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(tc.ENV, str(tmp_path / "tuning"))
    monkeypatch.setattr(tc, "machine", lambda: dict(STAMP))
    return tmp_path / "tuning"


def _timer(timed: list):
    def time_ms(cfg):
        timed.append(cfg)
        return SPEEDS[cfg]

    return time_ms


def _path(folder):
    return tc.cache_path(folder, STAMP)


def _write(folder, data) -> None:
    _path(folder).parent.mkdir(parents=True, exist_ok=True)
    _path(folder).write_text(data if isinstance(data, str) else json.dumps(data))


def _tuned_fresh(key=(64, "bf16")) -> tuple[str, list]:
    """The choice of a fresh persistent tuner for ``key`` and the configurations it timed."""
    timed: list = []
    return Tuner("toy", persist=True).pick(key, ["a", "b", "c"], _timer(timed), shape=[1, 2]), timed


def test_a_tuned_result_is_read_back_by_a_fresh_tuner_without_timing(folder):
    assert _tuned_fresh() == ("b", ["a", "b", "c"])
    data = json.loads(_path(folder).read_text())
    assert data == {"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "b", "ms": 1.0}}}}
    assert _path(folder).name == "gpu-test-gpu-cuda-driver-12080-torch-2-13-0-triton-3-9-0-dit-sparse-0-1-0.json"
    fresh = Tuner("toy", persist=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good file warns about nothing
        assert (
            fresh.pick((64, "bf16"), ["a", "b", "c"], lambda cfg: pytest.fail("timed a stored key"), shape=[1, 2])
            == "b"
        )
    assert fresh.log == [
        {"key": "(64, 'bf16')", "config": "b", "shape": [1, 2], "cached": str(_path(folder)), "stored_ms": 1.0}
    ]
    assert fresh.pick((64, "bf16"), ["a", "b", "c"], lambda cfg: pytest.fail("timed")) == "b" and len(fresh.log) == 1


def test_another_kernel_or_key_is_not_served_from_the_file(folder):
    _tuned_fresh()
    timed: list = []
    assert Tuner("other", persist=True).pick((64, "bf16"), ["a", "c"], _timer(timed)) == "c" and timed == ["a", "c"]
    assert _tuned_fresh((128, "bf16")) == ("b", ["a", "b", "c"])
    assert set(json.loads(_path(folder).read_text())["kernels"]) == {"toy", "other"}


def test_non_persistent_tuners_and_single_candidates_touch_no_file(folder):
    timed: list = []
    assert Tuner("toy").pick((64, "bf16"), ["a", "b"], _timer(timed)) == "b"
    assert Tuner("toy", persist=True).pick((64, "bf16"), ["c"], _timer(timed)) == "c"
    assert timed == ["a", "b", "c"] and not folder.exists()


def test_the_env_var_off_disables_the_cache(folder, monkeypatch):
    monkeypatch.setenv(tc.ENV, "off")
    assert tc.cache_folder() is None and tc.TuningFile.current() is None
    assert _tuned_fresh() == ("b", ["a", "b", "c"])
    assert _tuned_fresh() == ("b", ["a", "b", "c"])  # timed again: nothing was stored
    assert not folder.exists()


def test_the_default_folder_is_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(tc.ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tc.cache_folder() == tmp_path / ".cache" / "dit_sparse" / "tuning"


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "unreadable"),
        ('["a list"]', "not a format-1 tuning file"),
        ({"format": 2, "machine": STAMP, "kernels": {}}, "not a format-1 tuning file"),
        ({"format": 1, "machine": {**STAMP, "triton": "3.4.0"}, "kernels": {}}, "written for"),
        ({"format": 1, "machine": {**STAMP, "gpu": "NVIDIA H100"}, "kernels": {}}, "written for"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "z", "ms": 1}}}}, "none of"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": 3, "ms": 1}}}}, "malformed"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "a"}}}}, "malformed"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': "a"}}}, "malformed"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {"[64, 1.5]": {"config": "a", "ms": 1}}}}, "malformed"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": {"64": {"config": "a", "ms": 1}}}}, "malformed"),
        ({"format": 1, "machine": STAMP, "kernels": {"toy": ["a"]}}, "entries are not an object"),
    ],
)
def test_bad_files_and_entries_are_ignored_with_a_warning_naming_the_file(folder, content, says):
    _write(folder, content)
    with pytest.warns(UserWarning, match=says) as caught:
        assert _tuned_fresh() == ("b", ["a", "b", "c"])  # retuned, not trusted
    assert all(str(_path(folder)) in str(w.message) for w in caught)
    data = json.loads(_path(folder).read_text())  # rewritten with the new result
    assert data["machine"] == STAMP and data["kernels"]["toy"]['[64, "bf16"]'] == {"config": "b", "ms": 1.0}


def test_good_entries_survive_a_malformed_neighbour(folder):
    good = {"config": "c", "ms": 2.0}
    _write(folder, {"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': good, "[1]": None}}})
    with pytest.warns(UserWarning, match="malformed entry"):
        tuner = Tuner("toy", persist=True)
        assert tuner.pick((64, "bf16"), ["a", "b", "c"], lambda cfg: pytest.fail("timed")) == "c"


def test_concurrent_writers_merge(folder):
    first, second = Tuner("toy", persist=True), Tuner("toy", persist=True)
    timed: list = []
    first.pick(("k0",), ["a", "b"], _timer(timed))  # both tuners are in use before the other one writes
    second.pick(("k1",), ["a", "c"], _timer(timed))
    first.pick(("k2",), ["b", "c"], _timer(timed))
    entries = json.loads(_path(folder).read_text())["kernels"]["toy"]
    assert entries == {
        '["k0"]': {"config": "b", "ms": 1.0},
        '["k1"]': {"config": "c", "ms": 2.0},
        '["k2"]': {"config": "b", "ms": 1.0},
    }


def test_an_unwritable_folder_warns_and_keeps_the_result_in_the_process(folder, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(tc.ENV, str(tmp_path / "file" / "tuning"))  # under a file: cannot be created
    tuner = Tuner("toy", persist=True)
    with pytest.warns(UserWarning) as caught:
        assert tuner.pick((64,), ["a", "b"], _timer([])) == "b"
    unreadable, unwritten = (str(w.message) for w in caught)
    assert unreadable.startswith(f"tuning cache {_path(folder.parent / 'file' / 'tuning')}: unreadable")
    assert "not written (" in unwritten and f"set {tc.ENV} to a writable folder, or to off" in unwritten
    assert tuner.best == {(64,): "b"}


class _Key(NamedTuple):
    head_dim: int
    dtype: str
    perm: bool


def test_keys_serialise_losslessly():
    for key in [(64, "bf16"), (1, True, 0, False, "1"), (), _Key(128, "torch.bfloat16", True)]:
        back = tc.key_from_json(tc.key_to_json(key))
        assert back == tuple(key) and [type(x) for x in back] == [type(x) for x in key]
    assert tc.key_to_json((1, True)) != tc.key_to_json((1, 1))  # equal in Python, not on disk
    with pytest.raises(TypeError, match=r"tuning keys hold str, int or bool; \(1, 2.5\) holds \[2.5\]"):
        tc.key_to_json((1, 2.5))
    for bad in ('{"a": 1}', "[1.5]", "[[1]]", "[null]"):
        with pytest.raises(ValueError):
            tc.key_from_json(bad)


def test_a_named_tuple_key_is_found_under_its_stored_form(folder):
    key = _Key(128, "torch.bfloat16", True)
    Tuner("toy", persist=True).pick(key, ["a", "b"], _timer([]))
    assert Tuner("toy", persist=True).pick(key, ["a", "b"], lambda cfg: pytest.fail("timed")) == "b"


def test_the_machine_stamp_names_the_versions():
    stamp = tc.machine()
    import torch

    from dit_sparse import __version__

    assert stamp["torch"] == torch.__version__ and stamp["dit_sparse"] == __version__
    assert set(stamp) == {"gpu", "cuda_driver", "torch", "triton", "dit_sparse"}
    if not torch.cuda.is_available():
        assert stamp["gpu"] == "cpu" and stamp["cuda_driver"] is None


# ------------------------------------------------------------------------------------------------ shipped tables
TABLE_STAMP = {"gpu": "Test GPU", "triton": "3.9"}


@pytest.fixture
def tables(folder, tmp_path, monkeypatch):
    """An empty shipped-tables folder in place of the package's (the machine is STAMP)."""
    monkeypatch.setattr(tc, "TABLES_FOLDER", tmp_path / "tables")
    monkeypatch.delenv(tc.TABLES_ENV, raising=False)
    return tmp_path / "tables"


def _ship(tables, data, stamp=TABLE_STAMP) -> None:
    path = tc.cache_path(tables, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_a_shipped_table_serves_a_key_the_machines_file_lacks_without_timing_or_copying(tables, folder):
    assert tc.table_stamp() == TABLE_STAMP  # GPU name + triton major.minor, not the driver or torch
    _ship(tables, {"format": 1, "machine": TABLE_STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "c", "ms": 2}}}})
    tuner = Tuner("toy", persist=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuner.pick((64, "bf16"), ["a", "b", "c"], lambda cfg: pytest.fail("timed a shipped key")) == "c"
    assert tuner.log[0]["cached"] == str(tc.cache_path(tables, TABLE_STAMP)) and tuner.log[0]["stored_ms"] == 2.0
    assert not folder.exists()  # not copied into the machine's file
    assert _tuned_fresh((128, "bf16")) == ("b", ["a", "b", "c"])  # a key the table lacks is tuned


def test_the_machines_own_file_wins_over_the_shipped_table(tables, folder):
    _tuned_fresh()  # stores "b"
    _ship(tables, {"format": 1, "machine": TABLE_STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "c", "ms": 2}}}})
    assert Tuner("toy", persist=True).pick((64, "bf16"), ["a", "b", "c"], lambda cfg: pytest.fail("timed")) == "b"


def test_tables_of_another_gpu_are_never_read_and_the_env_var_turns_tables_off(tables, monkeypatch):
    good = {"format": 1, "machine": TABLE_STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "c", "ms": 2}}}}
    _ship(tables, "{not json", {"gpu": "NVIDIA H100", "triton": "3.9"})  # another GPU's table: not even opened
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tuned_fresh() == ("b", ["a", "b", "c"])
    _ship(tables, good)
    monkeypatch.setenv(tc.TABLES_ENV, "off")
    assert tc.shipped_table() is None
    assert _tuned_fresh((64, "x")) == ("b", ["a", "b", "c"])


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "unreadable"),
        ({"format": 1, "machine": {"gpu": "Test GPU", "triton": "3.8"}, "kernels": {}}, "written for"),
        ({"format": 1, "machine": TABLE_STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "z", "ms": 1}}}}, "none"),
    ],
)
def test_a_bad_shipped_table_is_ignored_with_a_warning(tables, content, says):
    _ship(tables, content)
    with pytest.warns(UserWarning, match=says):
        assert _tuned_fresh() == ("b", ["a", "b", "c"])


def test_export_writes_the_machines_file_as_a_table_and_never_overwrites(tables, folder, tmp_path):
    _tuned_fresh()
    path = tc.export_table(tables)
    data = json.loads(path.read_text())
    assert path == tc.cache_path(tables, TABLE_STAMP)
    assert data == {
        "format": 1,
        "machine": TABLE_STAMP,
        "kernels": {"toy": {'[64, "bf16"]': {"config": "b", "ms": 1.0}}},
    }
    with pytest.raises(FileExistsError, match="exists"):
        tc.export_table(tables)
    with pytest.raises(ValueError, match="no tuned entries"):
        tc.export_table(tmp_path / "t2", source=tmp_path / "missing.json")


def test_export_adds_the_machines_entries_to_the_shipped_table(tables, folder, tmp_path):
    shipped = {"toy": {'[64, "bf16"]': {"config": "c", "ms": 2.0}, '[32, "bf16"]': {"config": "a", "ms": 5.0}},
               "other": {'[1]': {"config": "x", "ms": 1.0}}}  # fmt: skip
    _ship(tables, {"format": 1, "machine": TABLE_STAMP, "kernels": shipped})
    _write(folder, {"format": 1, "machine": STAMP, "kernels": {"toy": {'[64, "bf16"]': {"config": "b", "ms": 1.0},
                                                                     '[128, "bf16"]': {"config": "a", "ms": 3.0}}}})  # fmt: skip
    data = json.loads(tc.export_table(tmp_path / "out").read_text())
    assert data["kernels"] == {
        "toy": {'[64, "bf16"]': {"config": "b", "ms": 1.0}, '[32, "bf16"]': {"config": "a", "ms": 5.0},
                '[128, "bf16"]': {"config": "a", "ms": 3.0}},
        "other": {'[1]': {"config": "x", "ms": 1.0}},
    }  # fmt: skip


TABLES = {  # file: (stamp, fewest attention keys)
    "gpu-nvidia-h100-80gb-hbm3-triton-3-6.json": ({"gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6"}, 120),
    "gpu-nvidia-h200-triton-3-6.json": ({"gpu": "NVIDIA H200", "triton": "3.6"}, 50),  # bf16 keys only since 2026-12-05
}


def test_the_package_ships_the_h100_and_h200_tables():
    assert sorted(p.name for p in tc.TABLES_FOLDER.glob("*.json")) == sorted(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_a_shipped_table_is_well_formed(name):
    stamp, fewest = TABLES[name]
    path = tc.TABLES_FOLDER / name
    data = json.loads(path.read_text())
    assert data["machine"] == stamp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels = tc._read(path, data["machine"])
    from dit_sparse.kernels.triton_attention import TuneKey

    entries = kernels["triton block-sparse attention"]
    assert len(entries) >= fewest
    assert all(len(tc.key_from_json(k)) == len(TuneKey._fields) for k in entries)
    mass = kernels["triton block mass"]  # AdaSpa's search: (head dim, dtype, block, LSE computed, size bucket)
    assert {tc.key_from_json(k)[3] for k in mass} == {True, False}  # both LSE modes


def test_wheels_carry_the_shipped_tables():
    """pyproject packages dit_sparse/kernels/tuned and its package-data globs match every table there."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "dit_sparse.kernels.tuned" in cfg["packages"]
    packaged = {p for g in cfg["package-data"]["dit_sparse.kernels.tuned"] for p in tc.TABLES_FOLDER.glob(g)}
    assert packaged == set(tc.TABLES_FOLDER.glob("*.json")) and packaged
