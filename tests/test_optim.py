"""BertAdam and the reference's warmup_linear schedule against their formulas, and in the training loop."""

import math

import pytest
import torch
from torch import nn

from kdqat_dist.config import TrainConfig, load_config
from kdqat_dist.engine.optim import BertAdam, bert_warmup_linear, clip_each_, linear_warmup_decay, make_optimizer


def _naive_bertadam(params, grads_per_step, lr_per_step, wd, clip, b1=0.9, b2=0.999, eps=1e-6):
    """The reference's update written out with plain tensors, one parameter at a time."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lr_per_step, strict=True):
        for i, g in enumerate(grads):
            norm = math.sqrt(float((g.double() ** 2).sum()))
            if clip > 0:
                g = g * min(1.0, clip / (norm + 1e-6))
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = m[i] / (v[i].sqrt() + eps) + wd * params[i]
            params[i] = params[i] - lr * update
    return params


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_bertadam_matches_its_formula_without_bias_correction(clip):
    torch.manual_seed(0)
    w = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4))]
    start = [p.detach().clone() for p in w]
    # gradients with norms above and below the clip, so clipping both acts and not
    grads = [[torch.randn(5, 3) * s, torch.randn(4) * 0.1] for s in (5.0, 0.2, 3.0)]
    lrs = [1e-2, 2e-2, 5e-3]
    opt = BertAdam([{"params": w, "weight_decay": 0.01}], lr=1.0, max_grad_norm=clip)
    for g, lr in zip(grads, lrs, strict=True):
        for p, gi in zip(w, g, strict=True):
            p.grad = gi.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
    expected = _naive_bertadam(start, grads, lrs, wd=0.01, clip=clip)
    for p, e in zip(w, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    # no bias correction: the first update of a lone step is lr * 0.1 g / (sqrt(0.001) |g|) = 3.16 lr
    q = nn.Parameter(torch.zeros(1))
    q.grad = torch.tensor([0.5])
    BertAdam([q], lr=1.0, max_grad_norm=0.0, eps=0.0).step()
    assert float(q.detach()) == pytest.approx(-0.1 / math.sqrt(0.001), rel=1e-5)


def test_clip_each_scales_one_tensor_as_clip_grad_norm_does():
    g = torch.tensor([3.0, 4.0])
    ref = g.clone().requires_grad_(False)
    p = nn.Parameter(torch.zeros(2))
    p.grad = ref.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    torch.testing.assert_close(clip_each_(g, 1.0), p.grad)
    small = torch.tensor([0.1, 0.2])
    torch.testing.assert_close(clip_each_(small.clone(), 1.0), small)  # under the norm: unchanged


def test_bert_warmup_linear_is_the_reference_schedule():
    fn = bert_warmup_linear(300, 0.1)
    assert fn(0) == 0.0  # the reference's first update has learning rate 0
    assert fn(15) == pytest.approx(0.5)
    assert fn(30) == pytest.approx(1.0)
    assert fn(165) == pytest.approx((1 - 165 / 300) / 0.9)
    assert fn(300) == 0.0 and math.copysign(1, fn(300)) == 1
    # ours: (step + 1) / warmup during warmup, so the two differ by one step there
    assert linear_warmup_decay(300, 0.1)(0) == pytest.approx(1 / 30)


def test_make_optimizer_picks_bertadam_with_the_run_settings():
    model = nn.Linear(3, 2)
    opt = make_optimizer(model, TrainConfig(optimizer="bertadam", max_grad_norm=0.5, adam_eps=1e-7))
    assert isinstance(opt, BertAdam)
    assert opt.defaults["max_grad_norm"] == 0.5 and opt.defaults["eps"] == 1e-7
    # under ZeRO the backend clips whole gradients itself
    assert make_optimizer(model, TrainConfig(optimizer="bertadam"), clip_each=False).defaults["max_grad_norm"] == 0
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)


def test_bertadam_run_takes_larger_early_steps_than_adamw(tiny_teacher, tmp_path):
    """In the loop: BertAdam's first update has lr 0 (the reference's schedule) and no bias correction,
    so after a few steps the student has moved further from the teacher's weights than AdamW's."""
    from kdqat_dist.engine.loop import Trainer

    def moved(opt: str) -> float:
        cfg = load_config(
            "tiny_debug",
            [
                f"teacher.path={tiny_teacher}",
                f"train.output_dir={tmp_path / opt}",
                "train.max_steps=6",
                "train.eval_every=6",
                f"train.optimizer={opt}",
                "train.lr=1e-4",
                "train.diagnostics=false",
            ],
        )
        tr = Trainer(cfg, "train").setup()
        start = {k: v.detach().clone() for k, v in tr.student.named_parameters()}
        try:
            tr.train()
        finally:
            tr.cleanup()
        return sum(float((p.detach() - start[k]).norm()) for k, p in tr.student.named_parameters())

    assert moved("bertadam") > 1.5 * moved("adamw")


def test_activation_clip_moves_at_quant_act_lr_not_q_p_times_faster(tiny_teacher):
    """KDLSQ's quant_act_lr is the rate of the clip; we learn the step = clip / Q_P, so the step's rate is
    quant_act_lr / Q_P: after one Adam update (sign-like, about lr in size) the clip moves by about
    quant_act_lr, not 127 times that."""
    from kdqat_dist.config import QuantConfig
    from kdqat_dist.engine.optim import param_groups
    from kdqat_dist.models.encoders import load_classifier
    from kdqat_dist.quant.api import fake_quantizers, prepare

    model = load_classifier(str(tiny_teacher), 2)
    q = QuantConfig()
    q.act.method = "lsq"
    prepare(model, q)
    cfg = TrainConfig(quant_act_lr=3e-2)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["quant_act_q127"]["lr"] == pytest.approx(3e-2 / 127)
    acts = [m for _, m in fake_quantizers(model) if hasattr(m, "step") and m.cfg.bits == 8]
    assert acts and len(groups["quant_act_q127"]["params"]) == len(acts)
    opt = torch.optim.AdamW([groups["quant_act_q127"]], betas=(0.9, 0.999))
    step = acts[0].step
    clip_before = float(step.detach()) * 127
    step.grad = torch.ones_like(step)
    opt.step()
    assert abs(float(step.detach()) * 127 - clip_before) == pytest.approx(3e-2, rel=0.05)


def test_weight_steps_get_quant_weight_lr_over_q_p(tiny_teacher):
    from kdqat_dist.config import QuantConfig
    from kdqat_dist.engine.optim import param_groups
    from kdqat_dist.models.encoders import load_classifier
    from kdqat_dist.quant.api import prepare

    model = load_classifier(str(tiny_teacher), 2)
    q = QuantConfig()
    q.weight.method, q.weight.bits = "lsq", 4
    prepare(model, q)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(quant_weight_lr=1e-3))}
    assert groups["quant_weight_q7"]["lr"] == pytest.approx(1e-3 / 7)  # W4 narrow range: Q_P = 7
