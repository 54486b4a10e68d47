"""Kernel front door and the reference / flex backends on the same plans (CPU)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dit_sparse import HEAD_SKIP, BlockPlan, StepContext, TokenLayout, get_method
from dit_sparse.kernels import block_sparse_attention, resolve_backend

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")


def qkv(b, h, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def sdpa_oracle(q, k, v, mask):
    """Exact masked attention in float64 (out, lse) with torch's own ops."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


LAYOUTS = [
    TokenLayout(3, 5, 7),  # 105 tokens: not a multiple of the block
    TokenLayout(2, 4, 6, text_len=11, text_where="prefix"),
    TokenLayout(3, 3, 5, text_len=9, text_where="suffix"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["video", "prefix", "suffix"])
@pytest.mark.parametrize("method", ["dense", "window"])
def test_reference_and_flex_agree_with_the_dense_mask(layout, method):
    params = dict(block_size=16, min_seq_len=0)
    if method == "window":
        params.update(tile=(1, 4, 4), window=(1, 0, 0))
    m = get_method(method, **params)
    q, k, v = qkv(2, 3, layout.seq_len, 16)
    ctx = StepContext(0, None, "cond", "blocks.0.attn1", 0, layout)
    plan = m.get_plan(q, k, layout, ctx)
    mask = plan.to_dense_mask()
    ref_out, ref_lse = sdpa_oracle(q, k, v, mask)
    for backend in ("reference", "flex"):
        out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        assert (out.double() - ref_out).abs().max() <= 1e-5, backend
        assert (lse.double() - ref_lse).abs().max() <= 1e-5, backend
    # text rows and columns are always fully attended
    text = layout.is_text()
    assert mask[..., text, :].all() and mask[..., :, text].all()


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_within_tolerance(dtype, tol):
    n, block = 90, 16
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 3, 6, 6, generator=g) < 0.5
    mask |= torch.eye(6, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(mask, n, block, perm=torch.randperm(n, generator=g))
    q, k, v = qkv(2, 3, n, 32, dtype)
    ref, _ = sdpa_oracle(q, k, v, plan.to_dense_mask())
    for backend in ("reference", "flex"):
        out = block_sparse_attention(q, k, v, plan, backend=backend)
        assert out.dtype == dtype
        rel = (out.double() - ref).norm() / ref.norm()
        assert rel < tol, (backend, rel)


def test_kv_len_masks_padded_keys_and_skip_heads_are_zero():
    n, block = 50, 16
    plan = BlockPlan.from_block_mask(torch.ones(1, 3, 4, 4, dtype=torch.bool), n, block, head_mode=(0, HEAD_SKIP, 0))
    q, k, v = qkv(2, 3, n, 16)
    kv_len = torch.tensor([50, 41])
    keep = torch.arange(n)[None, :] < kv_len[:, None]
    mask = plan.to_dense_mask() & keep[:, None, None, :]
    ref, ref_lse = sdpa_oracle(q, k, v, mask.expand(2, 3, n, n))
    for backend in ("reference", "flex"):
        out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True, kv_len=kv_len)
        assert torch.all(out[:, 1] == 0) and torch.isneginf(lse[:, 1]).all()
        for h in (0, 2):
            assert (out[:, h].double() - ref[:, h]).abs().max() <= 1e-5
            assert (lse[:, h].double() - ref_lse[:, h]).abs().max() <= 1e-5


def test_strided_inputs_as_diffusers_passes_them():
    """Diffusers hands SDPA a BHND view of BNHD memory."""
    n = 40
    base = torch.randn(3, 1, n, 2, 16).unbind(0)
    q, k, v = (x.squeeze(1).transpose(1, 2) for x in base)  # [1, 2, 40, 16], non-contiguous
    plan = BlockPlan.full(n, 16)
    out = block_sparse_attention(q, k, v, plan, backend="reference")
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_front_door_errors():
    n = 32
    plan = BlockPlan.full(n, 16)
    q, k, v = qkv(1, 2, n, 16)
    with pytest.raises(ValueError, match="one dtype"):
        block_sparse_attention(q, k.half(), v, plan)
    with pytest.raises(ValueError, match="share"):
        block_sparse_attention(q, k[:, :, :20], v, plan)
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        block_sparse_attention(q[0], k, v, plan)
    with pytest.raises(ValueError, match="dtype torch.int64 is not supported"):
        block_sparse_attention(q.long(), k.long(), v.long(), plan)
    with pytest.raises(ValueError, match="seq_len=32 but q/k/v have 40"):
        block_sparse_attention(*qkv(1, 2, 40, 16), plan)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        block_sparse_attention(q, k, v, plan, backend="cuda")
    with pytest.raises(ValueError, match="kv_len"):
        block_sparse_attention(q, k, v, plan, kv_len=torch.tensor([3, 4]))


def test_triton_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="(CUDA tensors|triton package)"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "reference"


def test_window_plan_geometry():
    layout = TokenLayout(4, 8, 8)
    m = get_method("window", block_size=32, tile=(1, 4, 8), window=(1, 0, 0), min_seq_len=0)
    q = torch.zeros(1, 1, layout.seq_len, 16)
    plan = m.get_plan(q, q, layout, StepContext(0, None, "cond", "x", 0, layout))
    dense = plan.to_dense_mask()[0, 0]
    coords = layout.video_coords()
    t, h = coords[:, 0], coords[:, 1]
    same_tile_rows = (h[:, None] // 4) == (h[None, :] // 4)
    near_frames = (t[:, None] - t[None, :]).abs() <= 1
    assert torch.equal(dense, same_tile_rows & near_frames)
    # the plan is cached: a second call returns the same object
    assert m.get_plan(q, q, layout, StepContext(1, None, "cond", "y", 1, layout)) is plan


def test_method_registry_errors():
    with pytest.raises(ValueError, match="unknown sparse-attention method 'radiall'; known methods: .*dense.*window"):
        get_method("radiall")
    with pytest.raises(TypeError, match="unknown hyper-parameter.*windw.*it takes:.*window"):
        get_method("window", windw=(1, 1, 1))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        get_method("dense", block_size=0)
    with pytest.raises(ValueError, match="tile .* holds 8 tokens but block_size is 128"):
        get_method("window", tile=(2, 2, 2))


def test_parse_method_spec():
    from dit_sparse.methods import parse_method_spec

    assert parse_method_spec("window:window=1,1,1;tile=2,8,8") == ("window", {"window": (1, 1, 1), "tile": (2, 8, 8)})
    assert parse_method_spec(" dense ") == ("dense", {})
    with pytest.raises(ValueError, match="write NAME:key=value"):
        parse_method_spec("window:window")
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        parse_method_spec("dense:decay=0.2")


def test_reference_fast_path_equals_its_lse_path():
    """Without return_lse the reference backend runs torch SDPA on the same token mask: same numbers."""
    n, block = 50, 16
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 3, 4, 4, generator=g) < 0.5
    mask |= torch.eye(4, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(mask, n, block, perm=torch.randperm(n, generator=g), head_mode=(0, HEAD_SKIP, 0))
    q, k, v = qkv(2, 3, n, 16)
    kv_len = torch.tensor([50, 37])
    fast = block_sparse_attention(q, k, v, plan, backend="reference", kv_len=kv_len)
    exact, _ = block_sparse_attention(q, k, v, plan, backend="reference", kv_len=kv_len, return_lse=True)
    assert torch.all(fast[:, 1] == 0)
    assert (fast - exact).abs().max() <= 1e-5


def test_reference_backend_never_builds_or_keeps_the_token_mask(monkeypatch):
    """The reference backend expands the block mask per chunk of query rows: no N×N tensor is created during a call
    and none is kept after it, in the plan's cache or anywhere else (it used to cache a 1 GB mask at 32k tokens)."""
    import gc

    from torch.utils._python_dispatch import TorchDispatchMode

    from dit_sparse.kernels import reference

    n, block = 301, 16
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 64 * n)  # 32 query rows per chunk (2 heads)
    g = torch.Generator().manual_seed(5)
    m = -(-n // block)
    mask = (torch.rand(1, 2, m, m, generator=g) < 0.4) | torch.eye(m, dtype=torch.bool)
    plan = BlockPlan.from_block_mask(mask, n, block, perm=torch.randperm(n, generator=g))
    q, k, v = qkv(1, 2, n, 16)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    ref, ref_lse = sdpa_oracle(q, k, v, plan.to_dense_mask())
    for return_lse in (False, True):
        with Largest():
            res = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=return_lse)
        out = res[0] if return_lse else res
        assert (out.double() - ref).abs().max() <= 1e-5
        if return_lse:
            assert (res[1].double() - ref_lse).abs().max() <= 1e-5
    assert Largest.numel < n * n  # the largest tensor of the calls: one chunk of scores, 2 x 32 x 301
    del ref, ref_lse, res, out
    gc.collect()
    square = [
        o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.dim() >= 2 and o.shape[-2:] == (n, n)
    ]
    assert square == []
    assert sum(t.numel() for t in plan.derived("reference", lambda: ()) if isinstance(t, torch.Tensor)) < n * n
