"""Stage 1's masked-language modelling (melp_ray.text_mlm.recipe): BERT-style, seeded masking."""
from __future__ import annotations

import torch

from melp_ray.text_mlm.recipe import IGNORE, mask_tokens


def test_mlm_masking_is_bert_style_and_seeded():
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (64, 128))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False            # [CLS] / [SEP] never predicted
    a_in, a_lab = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(7))
    b_in, b_lab = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(7))
    assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)  # same seed, same masks
    c_in, _ = mask_tokens(ids, maskable, 0.15, 4, 1000, torch.Generator().manual_seed(8))
    assert not torch.equal(a_in, c_in)

    selected = a_lab != IGNORE
    n = int(selected.sum())
    assert abs(n / int(maskable.sum()) - 0.15) < 0.01
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert torch.equal(a_lab[selected], ids[selected])            # labels = original tokens
    assert torch.equal(a_in[~selected], ids[~selected])           # unselected untouched
    masked = (a_in == 4) & selected
    kept = (a_in == ids) & selected
    assert abs(int(masked.sum()) / n - 0.8) < 0.03
    # 10% kept + the few random draws that hit the original token again
    assert abs(int(kept.sum()) / n - 0.1) < 0.03
    assert abs((n - int(masked.sum()) - int(kept.sum())) / n - 0.1) < 0.03
