"""3D: dense volumes (TokenLayout) and sparse voxels (VoxelLayout); window3d and ssa against the torch reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from dit_sparse.kernels import block_sparse_attention
from dit_sparse.layout import LayoutError, TokenLayout, VoxelLayout, morton3d
from dit_sparse.methods import get_method
from dit_sparse.methods.ssa import block_means
from dit_sparse.plan import token_to_block_mask
from dit_sparse.state import StepContext
from tests.host_sync import no_host_sync

SMALL_W3D = dict(block_size=16, cell=(2, 2, 4), window=(1, 1, 1))
SMALL_SSA = dict(block_size=16, cell=(2, 2, 4), topk=3, window=(1, 1, 1))


def _shell(res: int = 14, seed: int = 0, n: int | None = None) -> torch.Tensor:
    """Voxels of a sphere shell in a ``res³`` grid (optionally ``n`` of them, a compact piece), in a random order."""
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = (g.float() - (res - 1) / 2).norm(dim=1)
    c = g[(r > res / 2 - 2.5) & (r < res / 2 - 0.5)]
    if n is not None:
        c = c[:n]  # the part of the shell with the smallest first coordinates
    return c[torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))]


def _ctx(layout) -> StepContext:
    return StepContext(5, None, "cond", "blocks.0.attn", 0, layout)


def _qkv(n: int, batch: int = 2, heads: int = 2, d: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g).to(dtype) for _ in range(3)]


def _manual(q, k, v, plan) -> torch.Tensor:
    """Dense masked softmax over the plan's token mask, in float32 (independent of the kernels)."""
    mask = plan.to_dense_mask().expand(q.shape[0], q.shape[1], -1, -1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v.float()


LAYOUTS = {
    "volume": TokenLayout(5, 7, 9, batch=2),  # odd dense volume, N = 315
    "voxels": VoxelLayout(_shell(n=203), batch=2),  # N = 203: not a multiple of the block
    "voxels+text": VoxelLayout(_shell(n=150), text_len=7, text_where="prefix", batch=2),
}


# ------------------------------------------------------------------ layouts
def test_morton_code_interleaves_bits():
    c = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 1], [2, 0, 0], [3, 5, 6]])
    expected = [sum(((int(v) >> b) & 1) << (3 * b + 2 - a) for a, v in enumerate(row) for b in range(3)) for row in c]
    assert morton3d(c).tolist() == expected
    with pytest.raises(ValueError, match="2\\*\\*21"):
        morton3d(torch.tensor([[-1, 0, 0]]))


@pytest.mark.parametrize("text_where", ["none", "prefix", "suffix"])
def test_voxel_permutation_groups_cells_and_restores_order(text_where):
    coords = _shell()
    text = 0 if text_where == "none" else 5
    layout = VoxelLayout(coords, text_len=text, text_where=text_where)
    perm = layout.tile_permutation((4, 4, 4))
    assert sorted(perm.tolist()) == list(range(layout.seq_len))
    start, end = layout.text_range
    assert perm[start:end].tolist() == list(range(start, end))  # text keeps its place
    video = perm[layout.video_start : layout.video_start + layout.video_len] - layout.video_start
    cell = morton3d(coords[video] // 4)
    assert bool((cell[1:] >= cell[:-1]).all())  # cells in Morton order, each one contiguous
    assert torch.equal(perm[torch.argsort(perm)], torch.arange(layout.seq_len))


def test_morton_blocks_are_compact_pieces_of_space():
    layout = VoxelLayout(_shell(res=24))
    size = lambda lo, hi, ok: (hi - lo + 1)[ok].prod(-1).float().mean()  # noqa: E731  (mean bounding-box volume)
    model_order = size(*layout.block_extent(64))
    grouped = size(*layout.block_extent(64, layout.tile_permutation((4, 4, 4))))
    assert grouped < 0.1 * model_order  # measured: 678 against 10008 (a 24³ grid)


def test_voxel_layout_identity_and_errors():
    coords = _shell()
    a, b = VoxelLayout(coords), VoxelLayout(coords.clone().int())
    assert a == b and hash(a) == hash(b) and a.resolution == (13, 13, 13)  # the shell misses the outer layer
    c = dataclasses.replace(a, batch=2)
    assert c.digest == a.digest and c != a and c.batch == 2
    assert VoxelLayout(coords.flip(0)) != a
    assert {a: 1}[b] == 1
    with pytest.raises(ValueError, match="integer"):
        VoxelLayout(coords.float())
    with pytest.raises(ValueError, match=r"\[N >= 1, 3\]"):
        VoxelLayout(coords[:, :2])
    with pytest.raises(ValueError, match=">= 0"):
        VoxelLayout(coords - 5)
    with pytest.raises(ValueError, match="text_where"):
        VoxelLayout(coords, text_len=3)


@pytest.mark.parametrize("name", ["radial", "rettention", "svdit"])
def test_frame_based_methods_refuse_voxels(name):
    layout = VoxelLayout(_shell(n=203))
    q, k, _ = _qkv(layout.seq_len, batch=1)
    with pytest.raises(LayoutError, match="frame-based.*window3d, ssa"):
        get_method(name).get_plan(q, k, layout, _ctx(layout))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dense", {}),
        ("window", dict(tile=(2, 2, 4), block_size=16)),
        ("draft", dict(pool=(4, 4), block_size=16, sparsity=0.5)),
        ("adaspa", dict(block_size=16)),
    ],
)
def test_coordinate_methods_run_on_voxels(name, params):
    layout = LAYOUTS["voxels+text"]
    q, k, v = _qkv(layout.seq_len)
    plan = get_method(name, **params).get_plan(q, k, layout, _ctx(layout)).check()
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    torch.testing.assert_close(out, _manual(q, k, v, plan), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ window3d
def _chebyshev_token_mask(layout, window) -> torch.Tensor:
    """Token pairs (original order) within ``window`` cells along every axis, text rows/columns included."""
    n = layout.seq_len
    coords = torch.full((n, 3), -(10**6), dtype=torch.long)
    coords[layout.video_start : layout.video_start + layout.video_len] = layout.video_coords()
    near = ((coords[:, None] - coords[None]).abs() <= torch.tensor(window)).all(-1)
    text = layout.is_text()
    return near | text[:, None] | text[None, :]


@pytest.mark.parametrize("which", list(LAYOUTS))
def test_window3d_covers_the_neighbourhood_at_block_granularity(which):
    layout = LAYOUTS[which]
    q, k, _ = _qkv(layout.seq_len)
    plan = get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout))
    dense = plan.to_dense_mask()[0, 0]
    want = _chebyshev_token_mask(layout, SMALL_W3D["window"])
    assert bool(dense[want].all())  # every neighbour is attended


def test_window3d_is_sparse_on_a_voxel_surface():
    layout = VoxelLayout(_shell(res=24))  # 2,728 voxels; measured density 0.125
    q, k, _ = _qkv(layout.seq_len, batch=1, heads=1)
    plan = get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout))
    assert plan.density() < 0.15
    assert get_method("ssa", **SMALL_SSA).get_plan(q, k, layout, _ctx(layout)).density() < 0.17  # measured 0.139


def test_window3d_is_exact_when_blocks_are_cells():
    layout = TokenLayout(4, 6, 8)  # a whole number of (2, 2, 4) cells: each block is one cell
    q, k, _ = _qkv(layout.seq_len, batch=1, heads=1)
    plan = get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout))
    want = _chebyshev_token_mask(layout, SMALL_W3D["window"])
    assert torch.equal(plan.block_mask()[0, 0], token_to_block_mask(want[plan.perm][:, plan.perm], 16, 16))


@pytest.mark.parametrize("which", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window3d_kernels_equal_reference(which, dtype):
    layout = LAYOUTS[which]
    q, k, v = _qkv(layout.seq_len, dtype=dtype)
    plan = get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout))
    manual = _manual(q, k, v, plan)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for backend in ("reference", "flex") if dtype == torch.float32 else ("reference",):
        out = block_sparse_attention(q, k, v, plan, backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), manual, atol=tol, rtol=tol)


def test_window3d_defaults_on_a_dense_volume_are_cubes():
    cfg = get_method("window3d").config
    assert (cfg.block_size, cfg.cell, cfg.window) == (64, (4, 4, 4), (4, 4, 4))
    layout = TokenLayout(16, 16, 16)
    q, k, _ = _qkv(layout.seq_len, batch=1, heads=1)
    plan = get_method("window3d").get_plan(q, k, layout, _ctx(layout))
    lo, hi, _ = layout.block_extent(64, plan.perm)
    assert bool(((hi - lo) == 3).all())  # each block is one 4³ cube
    # a corner cube sees its 4-cell neighbourhood: cubes 0..1 along each axis (8 of 64)
    assert int(plan.kv_num_blocks[0, 0, 0]) == 8


# ------------------------------------------------------------------ ssa
def _independent_scores(q, k, perm, block):
    """Per (query block, key block): mean over the block's queries of softmax(q · mean-pooled k) (plain loops)."""
    b, h, n, d = q.shape
    qp, kp = q[:, :, perm].float(), k[:, :, perm].float()
    m = math.ceil(n / block)
    kbar = torch.stack([kp[:, :, j * block : (j + 1) * block].mean(2) for j in range(m)], 2)
    probs = torch.softmax(qp @ kbar.transpose(-1, -2) / math.sqrt(d), -1)
    return torch.stack([probs[:, :, i * block : (i + 1) * block].mean(2) for i in range(m)], 2)


@pytest.mark.parametrize("which", list(LAYOUTS))
def test_ssa_selects_topk_compressed_blocks_plus_the_window(which):
    layout = LAYOUTS[which]
    q, k, _ = _qkv(layout.seq_len, seed=3)
    method = get_method("ssa", **SMALL_SSA)
    plan = method.get_plan(q, k, layout, _ctx(layout)).check()
    mask = plan.block_mask()
    scores = _independent_scores(q, k, plan.perm, 16)
    top = torch.zeros_like(mask).scatter_(-1, scores.topk(3, dim=-1).indices, True)
    window = get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout)).block_mask()
    assert torch.equal(plan.perm, get_method("window3d", **SMALL_W3D).get_plan(q, k, layout, _ctx(layout)).perm)
    text = torch.zeros(mask.shape[-1], dtype=torch.bool)
    if layout.text_len:
        text[0] = True  # the prefix text sits in block 0
    forced = text[:, None] | text[None, :] | torch.eye(mask.shape[-1], dtype=torch.bool)
    assert torch.equal(mask, top | window | forced)
    assert not torch.equal(mask[0], mask[1])  # each sample gets its own selection


def test_block_means_include_the_partial_block():
    x = torch.randn(1, 1, 21, 4)
    perm = torch.randperm(21)
    counts = torch.tensor([8.0, 8.0, 5.0])
    means = block_means(x, 8, perm, counts)
    torch.testing.assert_close(means[0, 0, 2], x[0, 0, perm[16:]].mean(0))


@pytest.mark.parametrize("which", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssa_output_equals_reference_on_its_plan(which, dtype):
    layout = LAYOUTS[which]
    q, k, v = _qkv(layout.seq_len, dtype=dtype)
    plans = []

    def kernel(q_, k_, v_, plan, return_lse=False, aux_work=False):
        plans.append(plan)
        return block_sparse_attention(q_, k_, v_, plan, backend="reference"), None

    out = get_method("ssa", **SMALL_SSA).attend(q, k, v, layout, _ctx(layout), kernel)
    assert out.dtype == dtype and out.shape == q.shape
    manual = _manual(q, k, v, plans[0])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), manual, atol=tol, rtol=tol)
    if dtype == torch.float32:
        flex = block_sparse_attention(q, k, v, plans[0], backend="flex")
        torch.testing.assert_close(flex, manual, atol=1e-5, rtol=1e-5)


def test_ssa_with_every_block_selected_is_dense_attention():
    layout = LAYOUTS["voxels"]
    q, k, v = _qkv(layout.seq_len)
    plan = get_method("ssa", **{**SMALL_SSA, "topk": 1000}).get_plan(q, k, layout, _ctx(layout))
    assert plan.density() == 1.0
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan, backend="reference"), dense, atol=1e-5, rtol=1e-5)


def test_ssa_triton_kernel_runs_its_plan():
    pytest.importorskip("triton")
    layout = VoxelLayout(_shell(n=75), batch=1)
    q, k, v = _qkv(layout.seq_len, batch=1, heads=1)
    plan = get_method("ssa", **SMALL_SSA).get_plan(q, k, layout, _ctx(layout))
    out = block_sparse_attention(q, k, v, plan, backend="triton")
    torch.testing.assert_close(out, _manual(q, k, v, plan), atol=2e-4, rtol=2e-4)


def test_ssa_plans_without_host_sync_once_the_layout_is_known():
    layout = LAYOUTS["voxels+text"]
    q, k, _ = _qkv(layout.seq_len, dtype=torch.bfloat16)
    method = get_method("ssa", **SMALL_SSA)
    method.get_plan(q, k, layout, _ctx(layout))  # builds the geometry (once per layout)
    with no_host_sync():
        method.get_plan(q, k, layout, _ctx(layout))


def test_ssa_config_checks():
    cfg = get_method("ssa").config
    assert (cfg.block_size, cfg.cell, cfg.topk, cfg.window) == (64, (4, 4, 4), 16, (4, 4, 4))
    for bad in (dict(topk=0), dict(cell=(0, 4, 4)), dict(window=(-1, 0, 0))):
        with pytest.raises(ValueError, match="SsaConfig"):
            get_method("ssa", **bad)


# ------------------------------------------------------------------ the tiny 3D model's pieces
def test_grammar_shapes_and_volumes():
    from dit_sparse.model3d import shapes

    drawn = shapes.sample(7, 40)
    assert [s.caption for s in drawn] == [s.caption for s in shapes.sample(7, 40)]  # seeded
    assert all(shapes.parse(s.caption) == s for s in drawn)
    with pytest.raises(ValueError, match="grammar"):
        shapes.parse("a huge sphere")
    vol = shapes.sdf([shapes.Shape("sphere", "large", None), shapes.Shape("cube", "small", "left")])
    occ = vol[:, 0] < 0
    assert occ[0, 8, 8, 8] and not occ[0, 0, 0, 0]  # a large sphere fills the centre, not the corner
    w = occ[1].nonzero()[:, 2].float().mean()
    assert w < 6  # "at the left": low width indices
    assert vol.abs().max() <= 1


def test_model_patchify_roundtrip_and_prompt_errors():
    from dit_sparse.model3d.model import TinyDiT3D

    net = TinyDiT3D()
    x = torch.randn(2, 1, 16, 16, 16)
    assert torch.equal(net.unpatchify(net.patchify(x)), x)
    assert net.token_layout() == TokenLayout(8, 8, 8)
    with pytest.raises(ValueError, match="unknown words"):
        net.encode_prompts(["a purple sphere"])
    out = net(x, torch.rand(2), net.encode_prompts(["a large cube", ""]))
    assert out.shape == x.shape


def test_iou_and_chamfer():
    from dit_sparse.model3d import metrics, shapes

    a = shapes.sdf([shapes.Shape("cube", "small", "left")])
    b = shapes.sdf([shapes.Shape("cube", "small", "right")])
    assert float(metrics.iou(a, a)) == 1.0 and float(metrics.chamfer(a, a)) == 0.0
    assert float(metrics.iou(a, b)) == 0.0
    # the cubes are the same shape 0.9 apart along the width axis: every nearest neighbour is 0.9 away or less
    cd = float(metrics.chamfer(a, b))
    assert 0.5 < cd <= 0.9 + 1e-6


def test_ply_point_cloud_and_mesh(tmp_path):
    from dit_sparse.model3d import generate, shapes

    vol = shapes.sdf([shapes.Shape("sphere", "large", None)])[0]
    generate.write_ply(tmp_path / "p.ply", generate.cell_points(vol))
    text = (tmp_path / "p.ply").read_text().splitlines()
    count = int((vol < 0).sum())
    assert text[:3] == ["ply", "format ascii 1.0", f"element vertex {count}"] and len(text) == 7 + count
    generate.write_ply(tmp_path / "m.ply", generate.cell_points(vol)[:3], [[0, 1, 2]])
    assert (tmp_path / "m.ply").read_text().splitlines()[-1] == "3 0 1 2"
    if importlib.util.find_spec("skimage") is not None:
        verts, faces = generate.surface(vol)
        assert faces is not None and len(faces) > 100 and abs(verts).max() <= 1


# ------------------------------------------------------------------ the embedded model, sparse, and the CLI
def _embedded():
    from dit_sparse.model3d import model

    return model.load()


def test_embedded_model_draws_the_prompt():
    """The embedded model's dense samples match the procedural shapes their prompts name (mean IoU)."""
    from dit_sparse.model3d import generate, metrics, shapes

    net = _embedded()
    assert sum(f.stat().st_size for f in model_files()) <= 8 << 20
    prompts = ["a large sphere", "a large cube", "a small sphere at the left", "a small cylinder at the top"]
    vol = generate.sample(net, prompts, seed=1)
    truth = shapes.sdf([shapes.parse(p) for p in prompts])
    assert float(metrics.iou(vol, truth).mean()) > 0.5


def model_files():
    from dit_sparse.model3d.model import asset_path

    return [p for p in asset_path().iterdir() if p.is_file()]


@pytest.mark.parametrize(
    "spec",
    [
        ("dense", {}),
        ("window3d", dict(block_size=8, cell=(2, 2, 2), window=(1, 1, 1))),
        ("ssa", dict(block_size=8, cell=(2, 2, 2), topk=4, window=(1, 1, 1))),
    ],
)
def test_sparse_tiny_model_through_apply(spec):
    """apply(model, method, layout=...) routes the tiny model's F.sdpa self-attention; dense equals the model's own;
    remove is bit-exact."""
    import dit_sparse
    from dit_sparse.model3d import generate, metrics

    name, params = spec
    net = _embedded()
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    words = net.encode_prompts(["a large sphere", "a small cone at the back"])
    s = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        own = net(x, s, words)
        generate.make_sparse(net, name, params)
        sparse = net(x, s, words)
        rep = dit_sparse.report(net)
        dit_sparse.remove(net)
        again = net(x, s, words)
    assert torch.equal(again, own)
    assert rep.sparse_calls == net.config.depth and rep.dense_calls == 0
    if name == "dense":
        torch.testing.assert_close(sparse, own, atol=1e-5, rtol=1e-5)
    else:
        assert rep.density < 0.6 and not torch.equal(sparse, own)
        assert float(metrics.iou(sparse, own).mean()) > 0.8  # one velocity prediction stays close to dense


def test_generate3d_cli_writes_ply_and_preview_and_never_overwrites(tmp_path, capsys):
    from dit_sparse.cli import main

    out = tmp_path / "shape.ply"
    args = ["generate3d", "--prompt", "a large sphere", "--steps", "4", "--out", str(out)]
    assert main(args) == 0
    assert out.read_text().startswith("ply\n") and out.with_suffix(".png").stat().st_size > 1000
    before = out.read_bytes()
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert main(["generate3d", "--prompt", "a purple sphere", "--out", str(tmp_path / "x.ply")]) == 2
    assert "grammar" in capsys.readouterr().err


def test_generate3d_cli_sparse(tmp_path, capsys):
    from dit_sparse.cli import main

    out = tmp_path / "s.ply"
    cmd = ["generate3d", "--prompt", "a large cube", "--steps", "3", "--out", str(out), "--method", "ssa"]
    assert main([*cmd, "--param", "block_size=8", "--param", "cell=2,2,2", "--param", "topk=4"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "ssa" in text and out.is_file()
