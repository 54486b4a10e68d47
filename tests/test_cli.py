"""The ``dit-sparse`` command: clear errors on bad arguments, generate writes a video and refuses to overwrite."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from dit_sparse.cli import main

TINY_ARGS = ["--steps", "2", "--frames", "9", "--height", "64", "--width", "64", "--guidance", "5.0"]
SMALL = ["--param", "tile=1,2,2", "--param", "block_size=4", "--param", "min_seq_len=0"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dit_sparse.eval.testing import save_tiny_random_wan_pipeline

    return save_tiny_random_wan_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-wan")


def _err(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    return capsys.readouterr().err


def test_unknown_method_lists_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["generate", "a red circle", "--method", "nosuch"])
    assert "unknown method 'nosuch'" in err and "window" in err and "dense" in err


def test_bad_param_syntax_and_unknown_param(capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["generate", "a red circle", "--method", "window", "--param", "window"])
    assert "bad --param 'window': write key=value" in err
    err = _err(capsys, ["generate", "a red circle", "--method", "window", "--param", "nope=1"])
    assert "unknown hyper-parameter(s) nope" in err and "tile" in err
    err = _err(capsys, ["generate", "a red circle", "--method", "window", "--param", "window=-1,0,0"])
    assert "window" in err and "half-widths" in err


def test_missing_or_bad_model_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _err(
        capsys,
        ["generate", "x", "--method", "window", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "v.mp4")],
    )
    assert "does not exist" in err
    err = _err(
        capsys, ["generate", "x", "--method", "window", "--model", str(tmp_path), "--out", str(tmp_path / "v.mp4")]
    )
    assert "model_index.json" in err


def test_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--method", "window", "--steps", "0"])
    assert e.value.code == 2 and "must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x"])  # --method is required
    assert "--method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nosuchcommand"])


def test_eval_argument_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _err(capsys, ["eval", "--methods", "window,nosuch"])
    assert "--methods" in err and "known methods" in err
    err = _err(capsys, ["eval", "--methods", "window", "--seeds", "a,b"])
    assert "bad --seeds" in err
    err = _err(capsys, ["eval", "--methods", "window", "--prompts", str(tmp_path / "missing.txt")])
    assert "--prompts" in err and "does not exist" in err
    err = _err(capsys, ["eval", "--methods", "window", "--model", str(tmp_path / "nope")])
    assert "does not exist" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_bench_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["bench"])
    assert "needs an NVIDIA GPU" in err


def test_python_dash_m_help() -> None:
    res = subprocess.run([sys.executable, "-m", "dit_sparse", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "generate" in res.stdout and "eval" in res.stdout and "bench" in res.stdout
    assert "search" in res.stdout


def test_a_source_checkout_imports_without_an_install() -> None:
    """From the repository root, with the dependencies importable but no install hook of this package (``-S``: no
    ``.pth`` file runs), ``dit_sparse.pipelines`` and ``dit_sparse.eval`` come from this checkout's top-level folders."""
    root = Path(__file__).resolve().parent.parent
    code = "import dit_sparse.pipelines, dit_sparse.eval.run; print(dit_sparse.pipelines.__file__)"
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ.get("PATH", "")}
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()) == root / "pipelines" / "__init__.py"


def test_generate_writes_and_refuses_overwrite(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "v.mp4"
    argv = [
        "generate",
        "a red circle moving right",
        "--method",
        "window",
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--quiet",
        *TINY_ARGS,
        *SMALL,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    written = out if out.exists() else out.with_suffix(".gif")
    assert written.is_file() and written.stat().st_size > 0
    assert "time:" in printed and "density:" in printed and str(written) in printed
    mtime = written.stat().st_mtime_ns
    err = _err(capsys, argv)
    assert "exists; pass --force" in err and written.stat().st_mtime_ns == mtime
    assert main([*argv, "--force"]) == 0
    capsys.readouterr()


def test_generate_gif_fallback(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    video_mod = sys.modules["dit_sparse.eval.video"]
    monkeypatch.setattr(video_mod, "ffmpeg_available", lambda: (False, "no ffmpeg binary (test)"))
    out = tmp_path / "v.mp4"
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--method",
                "none",
                "--model",
                str(tiny_model),
                "--out",
                str(out),
                "--quiet",
                *TINY_ARGS,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert not out.exists() and out.with_suffix(".gif").is_file()
    assert "wrote a GIF instead" in printed and "no ffmpeg binary (test)" in printed
    # the GIF that would be written exists: refused without --force
    err = _err(
        capsys,
        ["generate", "a blue square", "--method", "none", "--model", str(tiny_model), "--out", str(out), *TINY_ARGS],
    )
    assert "exists; pass --force" in err


def test_eval_cli_on_tiny_model(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\n")
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        str(tiny_model),
        "--methods",
        "window:window=0,0,0",
        "--prompts",
        str(prompts),
        "--seeds",
        "0",
        "--out",
        str(out),
        "--quiet",
        "--no-lpips",
        "--error-sample",
        "0",
        *TINY_ARGS,
        *SMALL,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "window:block_size=4;min_seq_len=0;tile=1,2,2;window=0,0,0" in printed
    assert all((out / f).is_file() for f in ("results.jsonl", "results.csv", "pareto.png"))
    assert main(argv) == 0
    assert "resuming: 1 of 1 rows" in capsys.readouterr().out


def test_bench_delegates_to_bench_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dit_sparse import bench

    seen: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda *a, **k: seen.append(a))
    assert (
        main(["bench", "--methods", "window", "radial:decay=0.2", "--repeats", "3", "--out", str(tmp_path / "b")]) == 0
    )
    models, shapes, methods, repeats, out, command = seen[0]
    assert methods == ["window", "radial:decay=0.2"] and repeats == 3 and out == str(tmp_path / "b")
    assert command.startswith("dit-sparse ")


# ------------------------------------------------------------------------------------------------ checked up front


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a pipeline fails the test: every check below must come before it."""
    run_mod = importlib.import_module("dit_sparse.eval.run")  # the module (`dit_sparse.eval.run` is also a function)

    def load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(run_mod, "load_pipeline", load)


def test_output_path_checked_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None
) -> None:
    gen = ["generate", "a red circle", "--method", "window", *TINY_ARGS, "--out"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    err = _err(capsys, [*gen, str(a_file / "v.mp4")])
    assert "is a file, not a folder" in err and err.count("\n") == 1
    err = _err(capsys, [*gen, "/proc/no-such-folder/v.mp4"])
    assert "cannot write in" in err
    err = _err(capsys, [*gen, str(tmp_path / "v.avi")])
    assert "must end in .mp4 or .gif" in err
    (tmp_path / "dir.mp4").mkdir()
    err = _err(capsys, [*gen, str(tmp_path / "dir.mp4")])
    assert "is a folder" in err
    existing = tmp_path / "old.gif"
    existing.write_bytes(b"GIF89a")
    err = _err(capsys, [*gen, str(existing)])
    assert "exists; pass --force" in err and existing.read_bytes() == b"GIF89a"
    err = _err(capsys, [*gen, str(tmp_path / "new" / "sub" / "v.gif"), "--model", str(tmp_path / "nope")])
    assert "does not exist" in err and (tmp_path / "new" / "sub").is_dir()  # parents made, then the model refused


def test_output_verified_after_writing(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    video_mod = sys.modules["dit_sparse.eval.video"]
    out = tmp_path / "v.gif"
    monkeypatch.setattr(video_mod, "write_video", lambda path, video, fps: (Path(path), ""))  # writes nothing
    argv = ["generate", "x", "--method", "none", "--model", str(tiny_model), "--out", str(out), "--quiet", *TINY_ARGS]
    err = _err(capsys, argv)
    assert "was not written" in err and str(out) in err

    def broken(path, video, fps):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video_mod, "write_video", broken)
    err = _err(capsys, argv)
    assert "could not write the video" in err and "Traceback" not in err


def test_device_backend_dtype_model_checked_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_loading: None
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        err = _err(
            capsys, ["generate", "x", "--method", "window", "--backend", "triton", "--out", str(tmp_path / "v.gif")]
        )
        assert "--backend triton" in err and "CUDA" in err
        err = _err(
            capsys, ["generate", "x", "--method", "window", "--device", "cuda", "--out", str(tmp_path / "v.gif")]
        )
        assert "no CUDA device" in err
    err = _err(capsys, ["generate", "x", "--method", "window", "--device", "gpu0", "--out", str(tmp_path / "v.gif")])
    assert "is not a device" in err
    with pytest.raises(SystemExit) as e:
        main(["search", "--model", str(tmp_path), "--prompts", "a", "--out", str(tmp_path / "c.json"), "--dtype", "x"])
    assert e.value.code == 2 and "invalid choice: 'x'" in capsys.readouterr().err
    err = _err(
        capsys, ["search", "--model", str(tmp_path / "hub/id"), "--prompts", "a", "--out", str(tmp_path / "c.json")]
    )
    assert "does not exist" in err and "local files only" in err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--methods", "window", "--error-sample", "-1"])
    assert e.value.code == 2 and "must be >= 0" in capsys.readouterr().err
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}'
    )
    err = _err(
        capsys, ["generate", "x", "--method", "window", "--model", str(tmp_path), "--out", str(tmp_path / "v.gif")]
    )
    assert "FluxTransformer2DModel" in err and "WanTransformer3DModel" in err


def test_run_size_estimate_refuses_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_loading: None
) -> None:
    big = ["generate", "x", "--method", "window", "--device", "cpu", "--frames", "241", "--height", "1024", "--width",
           "1024", "--out", str(tmp_path / "v.gif")]  # fmt: skip
    err = _err(capsys, big)
    assert "999,424 video tokens per attention call (61x128x128)" in err  # (241 - 1) / 4 + 1 frames, 1024 / 8
    assert "does not fit" in err and "fewer --frames" in err and "a GPU" in err and err.count("\n") == 1
    with pytest.raises(AssertionError, match="loaded"):  # the override lets it through to the loading
        main([*big, "--ignore-estimate"])
    import dit_sparse.estimate as estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device: 2**50)
    err = _err(capsys, [*big, "--method", "none"])  # memory fits, time does not
    assert "would take very long" in err and "at least" in err
    monkeypatch.setattr(estimate, "available_memory", lambda device: 2**20)
    err = _err(capsys, ["generate", "x", "--method", "window", "--device", "cpu", "--out", str(tmp_path / "w.gif")])
    assert "does not fit" in err and "0.0 GiB available" in err


def test_params_true_false_and_bench_specs_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dit_sparse import bench
    from dit_sparse.cli import parse_params

    assert parse_params(["a=true", "b=FALSE", "c=True", "d=1,2", "e=text"]) == {
        "a": True, "b": False, "c": True, "d": (1, 2), "e": "text"
    }  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("bench.run called with a bad spec"))
    err = _err(capsys, ["bench", "--methods", "radial:nope=1"])
    assert "--methods radial:nope=1" in err and "unknown hyper-parameter" in err


def test_choices_come_from_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    from dit_sparse import available_methods, bench
    from dit_sparse.kernels.api import BACKENDS
    from dit_sparse.pipelines import supported_models

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in [*available_methods(), *supported_models()])
    assert "{" + ",".join(BACKENDS) + "}" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "{" + ",".join(sorted(bench.MODELS)) + "}" in capsys.readouterr().out.replace("\n", "").replace(" ", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_tune_needs_cuda_and_checks_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    err = _err(capsys, ["tune", "--shapes", "1,2,256"])
    assert "tune needs a CUDA GPU" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["tune", "--shapes", "1,2"])
    assert "BATCH,HEADS,SEQ_LEN" in capsys.readouterr().err
