"""The exportable forms of the towers compute what the original modules compute."""

import pytest
import torch
from torch import nn

from export.towers import ExportableSelfAttention, prepare_for_export


def _pair(width=32, heads=4):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    rewritten = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    rewritten.load_state_dict(reference.state_dict())
    rewritten.__class__ = ExportableSelfAttention
    return reference, rewritten


@pytest.mark.parametrize("mask", ["none", "causal_float", "causal_bool", "per_head"])
def test_exportable_self_attention_matches_multihead_attention(mask):
    reference, rewritten = _pair()
    x = torch.randn(3, 7, 32)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    attn_mask = {"none": None, "causal_float": torch.zeros(7, 7).masked_fill(causal, float("-inf")),
                 "causal_bool": causal, "per_head": torch.randn(3 * 4, 7, 7)}[mask]
    with torch.no_grad():
        expected = reference(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = rewritten(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_returned_weights_take_the_original_path():
    reference, rewritten = _pair()
    q, kv = torch.randn(2, 1, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(q, kv, kv, need_weights=False)[0],
                                   reference(q, kv, kv, need_weights=False)[0])
        x = torch.randn(2, 5, 32)
        out, weights = rewritten(x, x, x)  # need_weights defaults to True
        expected_out, expected_weights = reference(x, x, x)
    torch.testing.assert_close(out, expected_out)
    assert weights is not None and weights.shape == (2, 5, 5)
    torch.testing.assert_close(weights, expected_weights)


def test_prepare_for_export_leaves_the_callers_model_alone():
    import open_clip

    import mdmodels  # noqa: F401  (registers md-student-tiny)

    model = open_clip.create_model("md-student-tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_for_export(model)
    assert prepared.attention_rewritten == 4 + 3  # image and text layers
    assert all(type(m) is nn.MultiheadAttention for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    assert not any(p.requires_grad for p in prepared.model.parameters())
    assert not prepared.model.training
    # the caller's model: still training, still trainable, the same weights
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
