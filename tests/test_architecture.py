"""The networks: exact checkpoint layout at full size, and their math checked against independent computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer, group_norm
from ldm.checkpoint import POSITION_IDS, PREFIXES, SCHEDULE_BUFFERS
from ldm.config import load_config
from ldm.model import StableDiffusion, expected_shapes
from ldm.unet import ResBlock, timestep_embedding
from ldm.vae import AttnBlock, ResnetBlock

FIXTURES = Path(__file__).parent / "fixtures"
FULL_CONFIG = Path(__file__).parents[1] / "configs" / "v1-inference.yaml"


def test_full_size_keys_and_shapes_equal_a_real_sd_v1_checkpoint() -> None:
    real = json.loads((FIXTURES / "sd_v1_keys.json").read_text())["keys"]
    ignored = {*SCHEDULE_BUFFERS, POSITION_IDS}
    expected = {k["key"]: list(k["shape"]) for k in real if k["key"] not in ignored}
    ours = {
        PREFIXES[part] + key: list(shape)
        for part, shapes in expected_shapes(load_config(FULL_CONFIG)).items()
        for key, shape in shapes.items()
    }
    assert len(expected) == 1130
    assert ours == expected


def test_timestep_embedding_is_cos_then_sin() -> None:
    emb = timestep_embedding(torch.tensor([0, 500]), 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs] for t in (0, 500)]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_half_precision_group_norm_is_the_exact_one_rounded(
    dtype: torch.dtype, memory_format: torch.memory_format
) -> None:
    """Half-precision group norms compute in float32, as the original's: within one unit in the last place of
    the exact result, in either memory layout (bf16 models on the CPU run channels-last)."""
    generator = torch.Generator().manual_seed(0)
    norm = group_norm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1.0 + torch.randn(64, generator=generator))
        norm.bias.copy_(torch.randn(64, generator=generator))
    norm.to(dtype)  # a half-precision model's parameters: rounded, then used in float32
    x = (3.0 * torch.randn(2, 64, 6, 10, generator=generator) + 1.0).to(dtype)
    groups = x.double().reshape(2, 32, -1)
    mean, var = groups.mean(-1, keepdim=True), groups.var(-1, unbiased=False, keepdim=True)
    exact = ((groups - mean) / torch.sqrt(var + 1e-6)).reshape(x.shape)
    exact = exact * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
    ours = norm(x.contiguous(memory_format=memory_format))
    assert ours.dtype == dtype
    assert ((ours.double() - exact).abs() <= exact.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_cross_attention_equals_float64_softmax_attention() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=16, context_dim=12, heads=2, head_dim=8).double()
    x, context = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 12, dtype=torch.float64)
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    heads = []
    for h in range(2):
        sl = slice(8 * h, 8 * (h + 1))
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), dim=-1)
        heads.append(weights @ v[..., sl])
    expected = attn.to_out(torch.cat(heads, dim=-1))
    assert torch.allclose(attn(x, context), expected, atol=1e-12)


def test_vae_attention_equals_the_originals_bmm_form() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    h = block.norm(x)
    q, k, v = block.q(h).flatten(2), block.k(h).flatten(2), block.v(h).flatten(2)
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 32**-0.5, dim=2)
    expected = x + block.proj_out(torch.bmm(v, weights.transpose(1, 2)).view(2, 32, 3, 5))
    assert torch.allclose(block(x), expected, atol=1e-12)


def test_unet_accepts_latent_sides_that_are_not_multiples_of_its_depth(tiny_model: StableDiffusion) -> None:
    # The tiny UNet halves once: a 5x7 latent goes 5x7 → 3x4 and must come back to exactly 5x7.
    x = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = tiny_model.unet(x, torch.tensor([500]), context)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_blocks_computing_in_place_leave_their_inputs_alone() -> None:
    # The blocks reuse their own intermediate tensors (in-place SiLU and residual adds); the inputs, and the UNet's
    # timestep embedding that every ResBlock of a call shares, must come back untouched. Checked against the
    # blocks' formulas written out of place.
    torch.manual_seed(0)
    x, emb = torch.randn(2, 64, 3, 5), torch.randn(2, 16)
    saved_x, saved_emb = x.clone(), emb.clone()
    res = ResBlock(64, 16, 64)
    n1, c1, n2, c2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    h = c1(F.silu(n1(x))) + res.emb_layers[1](F.silu(emb))[:, :, None, None]
    assert torch.allclose(res(x, emb), x + c2(F.silu(n2(h))), atol=1e-6)
    vae_res = ResnetBlock(64, 64)
    h = vae_res.conv2(F.silu(vae_res.norm2(vae_res.conv1(F.silu(vae_res.norm1(x))))))
    assert torch.allclose(vae_res(x), x + h, atol=1e-6)
    AttnBlock(64)(x)
    SpatialTransformer(64, 2, 32, 1, 12)(x, torch.randn(2, 7, 12))
    assert torch.equal(x, saved_x) and torch.equal(emb, saved_emb)


def test_transformer_block_keeps_the_feature_maps_memory_layout() -> None:
    # SpatialTransformer hands its blocks a (b, c, h·w) map seen as (b, h·w, c); an answer in that layout reshapes
    # back to an ordinary map, where a contiguous one would turn into a channels-last map that slows the rest of the
    # UNet on the CPU.
    block = BasicTransformerBlock(64, 2, 32, 12).eval()
    x = torch.randn(2, 64, 15).transpose(1, 2)
    with torch.inference_mode():
        out = block(x, torch.randn(2, 7, 12))
    assert out.stride() == x.stride()
