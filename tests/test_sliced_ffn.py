"""The teacher's feed-forward blocks over token slices: same outputs, intermediate never whole."""

import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.models.sliced_ffn import slice_feed_forward


def test_sliced_feed_forward_gives_the_same_outputs_with_a_bounded_intermediate():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    whole = BertForSequenceClassification(cfg).eval()
    sliced = BertForSequenceClassification(cfg).eval()
    sliced.load_state_dict(whole.state_dict())
    b, s = 3, 13  # a sequence length that no slice size divides
    assert slice_feed_forward(sliced, max_elements=8 * 64) == 2  # 8 tokens a slice
    widths = []
    sliced.bert.encoder.layer[0].intermediate.register_forward_hook(lambda _m, i, _o: widths.append(i[0].shape[0]))
    ids = torch.randint(1, 50, (b, s), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        a = whole(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        c = sliced(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert widths == [8, 8, 8, 8, 7]  # 39 tokens, contiguous slices across samples
    for x, y in zip(a.hidden_states, c.hidden_states, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-6, atol=1e-6)
