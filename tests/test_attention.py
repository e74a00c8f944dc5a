"""The kdqat attention function's in-place score and softmax paths give the plain formulas' bits."""

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from kdqat_dist.models.attention import attention_probs, attention_scores, use_kdqat_attention
from kdqat_dist.models.taps import TapStore, tapped


def _scores() -> torch.Tensor:
    s = torch.randn(3, 2, 9, 9, generator=torch.Generator().manual_seed(0)) * 4
    s[1, ..., 6:] = torch.finfo(torch.float32).min  # padded keys, as the additive mask makes them
    return s


def test_softmax_written_over_the_scores_gives_the_same_bits():
    scores = _scores()
    want = F.softmax(scores, dim=-1)
    s = scores.clone()
    with torch.no_grad():
        p = attention_probs(s, overwrite=True)
    assert p.data_ptr() == s.data_ptr()  # no second [B, H, S, S] tensor
    assert torch.equal(p, want)


def test_softmax_tracked_by_autograd_is_never_written_over_its_input():
    s = _scores().requires_grad_()
    p = attention_probs(s * 1.0, overwrite=True)
    assert torch.equal(p, F.softmax(s.detach(), dim=-1))
    p.sum().backward()  # in place, the softmax's saved output would be its own input: this would fail
    assert s.grad is not None


def test_scores_scaled_and_masked_in_place_equal_the_out_of_place_formula():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    additive = torch.zeros(2, 1, 5, 5)
    additive[0, ..., 3:] = torch.finfo(torch.float32).min
    assert torch.equal(attention_scores(q, k, additive, 0.5), torch.matmul(q, k.transpose(-1, -2)) * 0.5 + additive)
    keep = additive == 0
    want = (torch.matmul(q, k.transpose(-1, -2)) * 0.5).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(attention_scores(q, k, keep, 0.5), want)
    wide = torch.zeros(2, 3, 5, 5)  # broadcasts the scores up: out of place
    assert attention_scores(q[:, :1], k[:, :1], wide, 0.5).shape == (2, 3, 5, 5)
    assert attention_scores(q[:, :1], k[:, :1], wide == 0, 0.5).shape == (2, 3, 5, 5)  # a wide keep-mask too


def test_strided_scores_are_not_written_over():
    scores = _scores().transpose(-1, -2)  # a strided view: the in-place kernel would mix up its rows
    with torch.no_grad():
        p = attention_probs(scores, overwrite=True)
    assert torch.equal(p, F.softmax(scores, dim=-1))


def test_a_tapped_teacher_forward_keeps_its_scores_intact():
    """Under no_grad the map overwrites the scores, unless the scores are tapped (the naive KD path keeps
    them all): the tapped scores must still be scores, not probabilities."""
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertModel(cfg).eval()
    use_kdqat_attention(model)
    store = TapStore()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), tapped(model, {"scores": {0}, "probs": {0}}, store):
        model(input_ids=ids)
    scores, probs = store["scores"][0], store["probs"][0]
    assert scores.data_ptr() != probs.data_ptr()
    assert torch.equal(F.softmax(scores, dim=-1), probs)
