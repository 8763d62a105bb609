"""The fused output layer + cross-entropy (fmforge.ops) against F.linear + F.cross_entropy; the allocator setting."""

import math
import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmforge.config import ModelConfig
from fmforge.device import keep_freed_memory
from fmforge.model import Transformer
from fmforge.ops import linear_cross_entropy


def plain(x, w, t, reduction):
    return F.cross_entropy(F.linear(x, w).float().reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def loss_and_grads(fn, x, w, t, reduction, autocast=False):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(x, w, t, reduction)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), width=st.integers(1, 12), vocab=st.integers(2, 60), chunk=st.integers(1, 400),
       ignored=st.floats(0.0, 1.0), reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16))
def test_matches_linear_then_cross_entropy_for_any_shape_and_chunking(rows, width, vocab, chunk, ignored, reduction,
                                                                       seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, width, generator=g), torch.randn(vocab, width, generator=g)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < ignored] = -100
    expected = loss_and_grads(plain, x, w, t, reduction)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_elements=chunk), x, w, t, reduction)
    if bool((t == -100).all()) and reduction == "mean":
        assert math.isnan(got[0]) and math.isnan(expected[0])  # 0 / 0, as F.cross_entropy gives
        return
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_agrees_with_the_unfused_bf16_path_and_keeps_dtypes():
    torch.manual_seed(0)
    x, w = torch.randn(3, 70, 48), torch.randn(300, 48) * 0.1
    t = torch.randint(0, 300, (3, 70))
    t[0, :10] = -100
    (l0, gx0, gw0), (l1, gx1, gw1) = (loss_and_grads(fn, x, w, t, "mean", autocast=True)
                                      for fn in (plain, lambda *a: linear_cross_entropy(*a, chunk_elements=1000)))
    assert l1.dtype == torch.float32 and gx1.dtype == x.dtype and gw1.dtype == w.dtype
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=0)
    torch.testing.assert_close(gx1, gx0, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(gw1, gw0, rtol=2e-2, atol=2e-4)


def test_a_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_only_the_loss():
    torch.manual_seed(0)
    x, w, t = torch.randn(10, 8, requires_grad=True), torch.randn(20, 8), torch.randint(0, 20, (10,))
    linear_cross_entropy(x, w, t, chunk_elements=50).backward()
    expected = x.detach().clone().requires_grad_()
    plain(expected, w, t, "mean").backward()
    torch.testing.assert_close(x.grad, expected.grad)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), plain(x, w, t, "mean"))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="none")


@pytest.mark.parametrize("tie", [True, False])
def test_the_model_trains_the_same_with_the_fused_loss(tie):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, context_length=32,
                                    tie_embeddings=tie))
    x = torch.randint(0, 97, (2, 24))
    y = torch.roll(x, -1, 1)
    y[:, -3:] = -100
    assert model.fuses_loss(x)
    grads = []
    for return_logits in (False, True):  # False: fused; True: the logits are wanted, so the plain path
        model.zero_grad(set_to_none=True)
        out = model(x, targets=y, return_logits=return_logits, reduction="sum")
        assert (out.logits is None) is not return_logits
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused), (plain_loss, unfused) = grads
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-4)
    for name in unfused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_the_allocator_setting():
    assert keep_freed_memory()
