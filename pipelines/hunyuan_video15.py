"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): joint attention with the conditions as a suffix; the
processor's pairwise padding mask is handed on as a key-padding mask."""

from __future__ import annotations

from types import FunctionType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dit_sparse.layout import TokenLayout
from dit_sparse.state import SITE_ATTR

from .base import ModelAdapter, grid_5d

_NATIVE = "diffusers.models.transformers.transformer_hunyuan_video15:HunyuanVideo15AttnProcessor2_0"


class HunyuanVideo15Adapter(ModelAdapter):
    """Latent ``(B, C, F, H, W)`` (65 channels: noisy latent, condition latent, mask); ``patch_size`` spatial,
    ``patch_size_t`` temporal (1 and 1 in every released config).

    Sparse: the self-attention of every dual-stream block (``transformer_blocks.i.attn``), over ``[video, conditions]``
    where the conditions are a suffix of ``image (SigLIP, 729) + ByT5 glyph text + Qwen text`` tokens, which the
    forward reorders per sample as ``[valid image, valid ByT5, valid Qwen, padding...]`` (text-to-video: the image
    tokens are all padding). Native: the token refiner's text self-attention (``AttnProcessor2_0``).

    Pitfall: the native processor builds a pairwise ``(B, 1, N, N)`` bool mask (``valid_q & valid_k``), not the
    ``(B, 1, 1, N)`` key mask dit_sparse's kernel takes (as ``kv_len``). The processor this adapter binds runs the
    model's own processor and hands its SDPA call the key mask instead: row 0 of the pairwise mask, a video query,
    which is always valid, so that row is ``key < video_len + valid conditions``. Video outputs are unchanged;
    padded condition *queries* then attend to the valid keys instead of producing zeros, which changes only padded
    condition tokens, which no later query attends to and the output drops.
    """

    model_class = "HunyuanVideo15Transformer3DModel"
    family = "HunyuanVideo 1.5"
    self_attention = r"transformer_blocks\.\d+\.attn"
    native_processors = (
        (r"transformer_blocks\.\d+\.attn", _NATIVE),
        (r".*token_refiner.*", "diffusers.models.attention_processor:AttnProcessor2_0"),
    )
    text_where = "suffix"
    key_padding_mask = True

    def layout(self, model: nn.Module, inputs: dict[str, Any]) -> TokenLayout:
        x = inputs["hidden_states"]
        p, pt = model.config.patch_size, model.config.patch_size_t
        t, h, w = grid_5d(x, (pt, p, p))
        text = sum(
            inputs[k].shape[1]
            for k in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")
            if inputs.get(k) is not None
        )
        return TokenLayout(t, h, w, text_len=text, text_where="suffix", batch=x.shape[0])

    def native_processor(self, name: str, module: nn.Module) -> Any:
        """The model's own processor; wrapped in a :class:`KeyMaskProcessor` for a self-attention module that
        dit_sparse tracks (it routes that module's calls), plain otherwise (what ``remove`` gives back)."""
        native = super().native_processor(name, module)
        tracked = module.__dict__.get(SITE_ATTR) is not None
        return KeyMaskProcessor(native) if tracked and self.is_self_attention(name) else native

    def install(self, model: nn.Module, processor: Any, tracker: Any) -> dict[str, Any]:
        originals = super().install(model, processor, tracker)
        for _, module in self.self_attention_modules(model):
            native = processor.native_of(module)
            if not isinstance(native, KeyMaskProcessor):
                processor.bind(module, KeyMaskProcessor(native))
        return originals

    def release(self, model: nn.Module) -> None:
        """Bind the plain native processor to every SparseProcessor on a self-attention module, so that ``remove``
        gives the model's own processors back (not the wrappers)."""
        from dit_sparse.processor import SparseProcessor

        for name, module in self.self_attention_modules(model):
            proc = module.processor
            if isinstance(proc, SparseProcessor):
                native = proc.native_of(module)
                if native is None:
                    native = super().native_processor(name, module)
                proc.bind(module, native.native if isinstance(native, KeyMaskProcessor) else native)


class KeyMaskProcessor:
    """The model's own HunyuanVideo 1.5 processor, whose self-attention SDPA call gets the key-padding row of its
    pairwise mask (``(B, 1, N, N)`` -> ``(B, 1, 1, N)``); what dit_sparse binds to the dual-stream blocks."""

    def __init__(self, native: Any) -> None:
        self.native = native

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        with _KeyRowOfPairMask():
            return self.native(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    @property
    def _attention_backend(self) -> Any:  # what Diffusers' set_attention_backend and dit_sparse set on a processor
        return self.native._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.native._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return self.native._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.native._parallel_config = value


class _KeyRowOfPairMask(TorchFunctionMode):
    """Replaces a square bool ``(B, 1, N, N)`` SDPA mask by its first row, ``(B, 1, 1, N)``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is not F.scaled_dot_product_attention:
            if isinstance(func, FunctionType) and args and getattr(torch.Tensor, func.__name__, None) is func:
                # a Tensor method written in Python (unflatten): Dynamo traces the method call, not its body under a
                # mode (as in dit_sparse.processor's compiled router)
                return getattr(args[0], func.__name__)(*args[1:], **(kwargs or {}))
            return func(*args, **(kwargs or {}))
        kwargs = {**dict(zip(_SDPA_PARAMS, args, strict=False)), **(kwargs or {})}
        mask, n = kwargs.get("attn_mask"), kwargs["query"].shape[-2]
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape[1:] == (1, n, n):
            kwargs["attn_mask"] = mask[:, :, :1, :]
        return func(**kwargs)


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
