"""Tests of the preference losses' maths on the naive path (`preference_loss_from_logits`).

Hand-derived values use a 3-token vocabulary whose logits are log-probabilities, so every token
log-prob is known exactly; identities between the losses use random logits in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fire_mpo_core.losses import (
    BRANCHES,
    IGNORE_INDEX,
    LossConfig,
    build_loss,
    preference_loss_from_logits,
    preference_outputs_from_logits,
)

F64 = torch.float64
U = [1 / 3, 1 / 3, 1 / 3]  # the reference's distribution everywhere in the hand batch

# Hand batch: B = 1, T = 3 (position 0 is prompt, -100), V = 3, span M(y) = position 1.
# Policy distributions per position and the resulting d(t) = l_theta - l_ref (l_ref = ln 1/3):
#   clean_chosen     y+ = [_, 0, 1]: [1/2,1/4,1/4] -> 1/2, d = ln(3/2) =: L
#                                    [1/4,1/2,1/4] -> 1/2, d = L
#   clean_rejected   y- = [_, 2, 1]: [1/2,1/4,1/4] -> 1/4, d = ln(3/4) =: M;   U -> d = 0
#   corrupt_chosen   y+ = [_, 0, 1]: [1/4,1/2,1/4] -> 1/4, d = M;  [1/2,1/4,1/4] -> 1/4, d = M
#   corrupt_rejected y- = [_, 2, 1]: [1/8,1/8,3/4] -> 3/4, d = ln(9/4) = 2L;  U -> d = 0
# so  r(v,y+) = 2bL,  r(v,y-) = bM,  r(v',y+) = 2bM,
#     r_M(v,y+) = bL, r_M(v,y-) = bM, r_M(v',y+) = bM, r_M(v',y-) = 2bL,
# and 2L - M = ln 3,  L - M = ln 2,  2L - 2M = 2 ln 2,  2L - M = ln 3.
L = math.log(3 / 2)
M = math.log(3 / 4)
HAND_PROBS = {
    "clean_chosen": [U, [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]],
    "clean_rejected": [U, [1 / 2, 1 / 4, 1 / 4], U],
    "corrupt_chosen": [U, [1 / 4, 1 / 2, 1 / 4], [1 / 2, 1 / 4, 1 / 4]],
    "corrupt_rejected": [U, [1 / 8, 1 / 8, 3 / 4], U],
}
HAND_LABELS = {
    "clean_chosen": [IGNORE_INDEX, 0, 1],
    "clean_rejected": [IGNORE_INDEX, 2, 1],
    "corrupt_chosen": [IGNORE_INDEX, 0, 1],
    "corrupt_rejected": [IGNORE_INDEX, 2, 1],
}
# KL at the span position of (v, y+), p = [1/2,1/4,1/4], q = U:
#   KL(q||p) = 1/3 [ln(2/3) + 2 ln(4/3)] = 1/3 ln(32/27);  KL(p||q) = 1/2 ln(3/2) + 1/2 ln(3/4)
#            = 1/2 ln(9/8).  Position 2 ([1/4,1/2,1/4]) is a permutation, so the same values.
KL_FWD_SPAN = math.log(32 / 27) / 3
KL_REV_SPAN = math.log(9 / 8) / 2


def _nlsig(x: float) -> float:
    """-log sig(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def hand_batch(has_corrupted: bool = True):
    policy = {k: torch.tensor([p], dtype=F64).log() for k, p in HAND_PROBS.items()}
    reference = {k: torch.full((1, 3, 3), 1 / 3, dtype=F64).log() for k in HAND_PROBS}
    labels = {k: torch.tensor([v]) for k, v in HAND_LABELS.items()}
    spans = {k: torch.tensor([[False, True, False]]) for k in HAND_PROBS}
    return policy, reference, labels, spans, torch.tensor([has_corrupted])


def hand_loss(cfg: LossConfig, has_corrupted: bool = True) -> float:
    out = preference_loss_from_logits(cfg, *hand_batch(has_corrupted))
    assert out.shape == (1,)
    return out.item()


BETA = 0.5
ALPHA = 0.2
GAMMA = 0.3
LAMBDA = 0.25


class TestHandValues:
    def test_dpo(self):
        # margin = r(v,y+) - r(v,y-) = b(2L - M) = b ln 3 -> loss = log(1 + 3^-b)
        cfg = LossConfig(name="dpo", beta=BETA)
        assert hand_loss(cfg) == pytest.approx(math.log1p(3**-BETA), abs=1e-12)
        assert hand_loss(cfg) == pytest.approx(_nlsig(BETA * (2 * L - M)), abs=1e-12)

    def test_mask_dpo(self):
        # margin = r_M(v,y+) - r_M(v,y-) = b(L - M) = b ln 2 -> loss = log(1 + 2^-b)
        cfg = LossConfig(name="mask_dpo", beta=BETA)
        assert hand_loss(cfg) == pytest.approx(math.log1p(2**-BETA), abs=1e-12)

    def test_rrpo_all_tokens(self):
        # KL(ref||theta) over both response tokens of y+ = 2 * 1/3 ln(32/27)
        cfg = LossConfig(name="rrpo", beta=BETA, alpha=ALPHA)
        expected = math.log1p(2**-BETA) + ALPHA * 2 * KL_FWD_SPAN
        assert hand_loss(cfg) == pytest.approx(expected, abs=1e-12)

    def test_rrpo_spans(self):
        cfg = LossConfig(name="rrpo", beta=BETA, alpha=ALPHA, rrpo_kl_on="spans")
        expected = math.log1p(2**-BETA) + ALPHA * KL_FWD_SPAN
        assert hand_loss(cfg) == pytest.approx(expected, abs=1e-12)

    def test_mdpo(self):
        # DPO part: log(1 + 3^-b); conditional: r(v,y+) - r(v',y+) = b(2L - 2M) = 2b ln 2
        # -> log(1 + 4^-b); anchor: -log sig(2bL) = log(1 + (2/3)^(2b)).
        cfg = LossConfig(name="mdpo", beta=BETA)
        expected = math.log1p(3**-BETA) + math.log1p(4**-BETA) + math.log1p((2 / 3) ** (2 * BETA))
        assert hand_loss(cfg) == pytest.approx(expected, abs=1e-12)
        # without v' the conditional term is gone
        expected_no_v = math.log1p(3**-BETA) + math.log1p((2 / 3) ** (2 * BETA))
        assert hand_loss(cfg, has_corrupted=False) == pytest.approx(expected_no_v, abs=1e-12)

    @pytest.mark.parametrize(
        ("direction", "visual"),
        [
            # reverse: r_M(v',y-) - r_M(v',y+) = b(2L - M) = b ln 3
            ("reverse", math.log1p(3**-BETA)),
            # v1: r_M(v,y+) - r_M(v',y+) = b(L - M) = b ln 2
            ("v1", math.log1p(2**-BETA)),
            # v2: r_M(v,y+) - r_M(v',y-) = b(L - 2L) = -bL -> log(1 + (3/2)^b)
            ("v2", math.log1p(1.5**BETA)),
        ],
    )
    def test_fire_mpo(self, direction, visual):
        cfg = LossConfig(
            name="fire_mpo",
            beta=BETA,
            alpha=ALPHA,
            gamma=GAMMA,
            lambda_=LAMBDA,
            visual_direction=direction,
        )
        kl = LAMBDA * KL_FWD_SPAN + (1 - LAMBDA) * KL_REV_SPAN
        expected = math.log1p(2**-BETA) + GAMMA * visual + ALPHA * kl
        assert hand_loss(cfg) == pytest.approx(expected, abs=1e-12)

    def test_fire_mpo_parts(self):
        cfg = LossConfig(name="fire_mpo", beta=BETA, alpha=ALPHA, gamma=GAMMA, lambda_=LAMBDA)
        out = preference_outputs_from_logits(cfg, *hand_batch())
        assert out.chosen_rewards.item() == pytest.approx(BETA * L, abs=1e-12)
        assert out.rejected_rewards.item() == pytest.approx(BETA * M, abs=1e-12)
        assert out.margins.item() == pytest.approx(BETA * math.log(2), abs=1e-12)
        assert out.visual_margin.item() == pytest.approx(BETA * math.log(3), abs=1e-12)
        assert out.kl_forward.item() == pytest.approx(KL_FWD_SPAN, abs=1e-12)
        assert out.kl_reverse.item() == pytest.approx(KL_REV_SPAN, abs=1e-12)
        # NLL of y+ under v: mean of -ln(1/2), -ln(1/2) = ln 2
        assert out.nll.item() == pytest.approx(math.log(2), abs=1e-12)
        metrics = out.metrics()
        assert metrics["rewards/accuracy"] == 1.0
        assert metrics["visual/margin"] == pytest.approx(BETA * math.log(3), abs=1e-9)

    def test_nll_weight_adds_mean_nll(self):
        # DPO + 0.7 * ln 2 (mean NLL of y+ computed above)
        cfg = LossConfig(name="dpo", beta=BETA, nll_weight=0.7)
        assert hand_loss(cfg) == pytest.approx(math.log1p(3**-BETA) + 0.7 * math.log(2), abs=1e-12)


def random_batch(B=4, T=7, V=5, seed=0, spans_prob=0.4, corrupted=(True, False, True, True)):
    g = torch.Generator().manual_seed(seed)
    policy, reference, labels, spans = {}, {}, {}, {}
    for k in BRANCHES:
        policy[k] = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
        reference[k] = torch.randn(B, T, V, generator=g, dtype=F64)
        lab = torch.randint(0, V, (B, T), generator=g)
        lab[:, :2] = IGNORE_INDEX  # prompt
        lab[0, -1] = IGNORE_INDEX  # padding in one row
        labels[k] = lab
        spans[k] = torch.rand(B, T, generator=g) < spans_prob
        spans[k][:, 2] = True  # every pair has a non-empty span
    return policy, reference, labels, spans, torch.tensor(corrupted[:B])


def loss_of(batch, **cfg):
    return preference_loss_from_logits(LossConfig(**cfg), *batch)


class TestIdentities:
    def test_fire_mpo_without_kl_and_visual_is_mask_dpo(self):
        b = random_batch()
        got = loss_of(b, name="fire_mpo", alpha=0.0, gamma=0.0)
        torch.testing.assert_close(got, loss_of(b, name="mask_dpo"), rtol=0, atol=1e-12)

    def test_mask_dpo_with_full_spans_is_dpo(self):
        policy, reference, labels, spans, hc = random_batch()
        full = {k: torch.ones_like(v) for k, v in spans.items()}
        got = loss_of((policy, reference, labels, full, hc), name="mask_dpo")
        expected = loss_of((policy, reference, labels, full, hc), name="dpo")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # and with real spans they differ, so the identity is not vacuous
        assert not torch.allclose(
            loss_of((policy, reference, labels, spans, hc), name="mask_dpo"), expected
        )

    def test_fire_mpo_forward_only_is_rrpo_on_spans(self):
        b = random_batch()
        got = loss_of(b, name="fire_mpo", alpha=0.3, gamma=0.0, lambda_=1.0)
        expected = loss_of(b, name="rrpo", alpha=0.3, rrpo_kl_on="spans")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    def test_kl_of_identical_distributions_is_zero(self):
        policy, _, labels, spans, hc = random_batch()
        same = {k: v.detach().clone() for k, v in policy.items()}
        out = preference_outputs_from_logits(
            LossConfig(name="fire_mpo"), policy, same, labels, spans, hc
        )
        torch.testing.assert_close(out.kl_forward, torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)
        torch.testing.assert_close(out.kl_reverse, torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)
        # identical policy and reference: all rewards 0, so every ranking term is log 2
        torch.testing.assert_close(out.margins, torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)

    def test_kl_is_positive_and_asymmetric(self):
        out = preference_outputs_from_logits(LossConfig(name="fire_mpo"), *random_batch())
        assert bool((out.kl_forward > 0).all()) and bool((out.kl_reverse > 0).all())
        assert not torch.allclose(out.kl_forward, out.kl_reverse)

    @pytest.mark.parametrize(("lam", "field"), [(1.0, "kl_forward"), (0.0, "kl_reverse")])
    def test_lambda_picks_kl_direction(self, lam, field):
        b = random_batch()
        out = preference_outputs_from_logits(
            LossConfig(name="fire_mpo", alpha=0.4, gamma=0.0, lambda_=lam), *b
        )
        expected = loss_of(b, name="mask_dpo") + 0.4 * getattr(out, field)
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("name", ["fire_mpo", "mdpo"])
    def test_batch_without_corrupted_images_skips_visual_term(self, name):
        policy, reference, labels, spans, _ = random_batch()
        none = torch.zeros(4, dtype=torch.bool)
        clean = ("clean_chosen", "clean_rejected")
        only_clean = [{k: d[k] for k in clean} for d in (policy, reference, labels, spans)]
        got = preference_loss_from_logits(LossConfig(name=name), *only_clean, none)
        # corrupt branches present but flagged absent: same result
        got_present = preference_loss_from_logits(
            LossConfig(name=name), policy, reference, labels, spans, none
        )
        if name == "fire_mpo":
            expected = loss_of((policy, reference, labels, spans, none), name=name, gamma=0.0)
        else:  # mDPO without v' is DPO plus its anchor -log sig(r(v,y+))
            out = preference_outputs_from_logits(LossConfig(name="dpo"), *only_clean, none)
            expected = out.loss - torch.nn.functional.logsigmoid(out.chosen_rewards)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_present, expected, rtol=0, atol=1e-12)

    def test_visual_term_only_for_pairs_with_corrupted_image(self):
        b = random_batch(corrupted=(True, False, True, False))
        with_v = loss_of(b, name="fire_mpo", gamma=0.5)
        without = loss_of(b, name="fire_mpo", gamma=0.0)
        active = b[-1]
        torch.testing.assert_close(with_v[~active], without[~active], rtol=0, atol=1e-12)
        assert bool((with_v[active] > without[active]).all())  # -log sig(.) > 0 is added

    def test_visual_term_gives_no_gradient_to_pairs_without_corrupted_image(self):
        policy, reference, labels, spans, _ = random_batch()
        hc = torch.tensor([True, False, True, False])
        loss = loss_of((policy, reference, labels, spans, hc), name="fire_mpo", gamma=0.5)
        grad = torch.autograd.grad(loss.sum(), policy["corrupt_chosen"])[0]
        assert bool((grad[~hc] == 0).all()) and bool((grad[hc] != 0).any())


class TestEdgeCases:
    @pytest.mark.parametrize("name", ["dpo", "mask_dpo", "rrpo", "mdpo", "fire_mpo"])
    def test_reduction_is_per_pair(self, name):
        b = random_batch()
        cfg = {"name": name} if name != "rrpo" else {"name": name, "rrpo_kl_on": "spans"}
        whole = loss_of(b, **cfg)
        assert whole.shape == (4,)
        # each pair alone gives the same value: no cross-pair reduction inside the loss
        for i in range(4):
            one = (*({k: v[i : i + 1] for k, v in d.items()} for d in b[:4]), b[4][i : i + 1])
            torch.testing.assert_close(loss_of(one, **cfg), whole[i : i + 1], rtol=0, atol=1e-12)

    @pytest.mark.parametrize("name", ["mask_dpo", "rrpo", "fire_mpo"])
    def test_empty_spans_give_finite_loss(self, name):
        policy, reference, labels, spans, hc = random_batch()
        empty = {k: torch.zeros_like(v) for k, v in spans.items()}
        cfg = LossConfig(name=name, rrpo_kl_on="spans") if name == "rrpo" else LossConfig(name=name)
        out = preference_outputs_from_logits(cfg, policy, reference, labels, empty, hc)
        # r_M = 0 on every branch, KL over M(y+) = 0: each span term is -log sig(0) = log 2
        expected = math.log(2) * (1 + (cfg.gamma * hc.to(F64) if name == "fire_mpo" else 0))
        torch.testing.assert_close(out.loss, torch.as_tensor(expected, dtype=F64).expand(4))
        torch.testing.assert_close(out.kl_forward, torch.zeros(4, dtype=F64))
        grads = torch.autograd.grad(out.loss.sum(), list(policy.values()), allow_unused=True)
        assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)

    def test_labels_outside_response_are_ignored(self):
        policy, reference, labels, spans, hc = random_batch()
        base = loss_of((policy, reference, labels, spans, hc), name="fire_mpo")
        # changing logits and span flags at prompt positions changes nothing
        policy2 = {k: v.detach().clone() for k, v in policy.items()}
        spans2 = {k: v.clone() for k, v in spans.items()}
        for k in BRANCHES:
            policy2[k][:, :2] += 5.0
            spans2[k][:, :2] = True
        got = loss_of((policy2, reference, labels, spans2, hc), name="fire_mpo")
        torch.testing.assert_close(got, base.detach(), rtol=0, atol=1e-12)

    def test_reference_gets_no_gradient(self):
        policy, reference, labels, spans, hc = random_batch()
        reference = {k: v.clone().requires_grad_(True) for k, v in reference.items()}
        loss = loss_of((policy, reference, labels, spans, hc), name="fire_mpo").sum()
        loss.backward()
        assert all(v.grad is None for v in reference.values())
        assert policy["clean_chosen"].grad is not None

    def test_bfloat16_logits_are_upcast(self):
        policy, reference, labels, spans, hc = random_batch()
        low = [
            {k: v.detach().to(torch.bfloat16) for k, v in d.items()} for d in (policy, reference)
        ]
        got = preference_loss_from_logits(LossConfig(name="fire_mpo"), *low, labels, spans, hc)
        assert got.dtype == torch.float32
        expected = loss_of(
            ({k: v.to(F64) for k, v in low[0].items()}, {k: v.to(F64) for k, v in low[1].items()},
             labels, spans, hc),
            name="fire_mpo",
        )  # fmt: skip
        torch.testing.assert_close(got.to(F64), expected.detach(), rtol=1e-5, atol=1e-5)

    def test_missing_corrupt_branch_is_an_error(self):
        policy, reference, labels, spans, hc = random_batch()
        del policy["corrupt_rejected"]
        with pytest.raises(ValueError, match="corrupt_rejected"):
            preference_loss_from_logits(
                LossConfig(name="fire_mpo"), policy, reference, labels, spans, hc
            )
        # v1 reads only corrupt_chosen, so it runs without corrupt_rejected
        out = preference_loss_from_logits(
            LossConfig(name="fire_mpo", visual_direction="v1"), policy, reference, labels, spans, hc
        )
        assert out.shape == (4,)

    def test_unknown_branch_is_an_error(self):
        policy, reference, labels, spans, hc = random_batch()
        policy["clean"] = policy["clean_chosen"]
        with pytest.raises(ValueError, match="unknown branch 'clean'"):
            preference_loss_from_logits(
                LossConfig(name="dpo"), policy, reference, labels, spans, hc
            )

    def test_gradient_raises_chosen_and_lowers_rejected(self):
        policy, reference, labels, spans, hc = random_batch()
        loss = loss_of((policy, reference, labels, spans, hc), name="dpo").sum()
        g_c, g_r = torch.autograd.grad(loss, [policy["clean_chosen"], policy["clean_rejected"]])
        # d loss / d l_theta(y+) < 0 at each response token's label: descent raises its logit
        mask = labels["clean_chosen"] != IGNORE_INDEX
        idx = labels["clean_chosen"].clamp(min=0).unsqueeze(-1)
        assert bool((g_c.gather(-1, idx).squeeze(-1)[mask] < 0).all())
        mask_r = labels["clean_rejected"] != IGNORE_INDEX
        idx_r = labels["clean_rejected"].clamp(min=0).unsqueeze(-1)
        assert bool((g_r.gather(-1, idx_r).squeeze(-1)[mask_r] > 0).all())


class TestConfig:
    def test_defaults_are_the_papers(self):
        cfg = LossConfig()
        assert (cfg.beta, cfg.alpha, cfg.gamma, cfg.lambda_) == (0.1, 0.01, 0.1, 0.5)
        assert cfg.visual_direction == "reverse" and cfg.rrpo_kl_on == "all"

    def test_unknown_key_is_rejected(self):
        with pytest.raises(ValidationError, match="lambda"):
            LossConfig(lambda_=0.5, **{"lambda": 0.3})

    @pytest.mark.parametrize("value", [-0.1, 1.1])
    def test_lambda_outside_unit_interval(self, value):
        with pytest.raises(ValidationError, match="lambda_"):
            LossConfig(lambda_=value)

    def test_visual_direction_conflicts_with_name(self):
        with pytest.raises(ValidationError) as err:
            LossConfig(name="mdpo", visual_direction="v1")
        assert "visual_direction" in str(err.value) and "name='mdpo'" in str(err.value)

    def test_rrpo_kl_on_conflicts_with_name(self):
        with pytest.raises(ValidationError) as err:
            LossConfig(name="fire_mpo", rrpo_kl_on="spans")
        assert "rrpo_kl_on" in str(err.value) and "name='fire_mpo'" in str(err.value)

    def test_assignment_is_validated(self):
        cfg = LossConfig(name="rrpo", rrpo_kl_on="spans")
        with pytest.raises(ValidationError, match="rrpo_kl_on"):
            cfg.name = "dpo"

    def test_every_field_has_a_description(self):
        assert all(f.description for f in LossConfig.model_fields.values())

    def test_build_loss_reflects_requirements(self):
        assert build_loss(LossConfig(name="dpo")).kl_on is None
        assert build_loss(LossConfig(name="rrpo")).kl_on == "all"
        assert build_loss(LossConfig(name="fire_mpo")).kl_on == "spans"
        assert build_loss(LossConfig(name="fire_mpo")).corrupt_branches == (
            "corrupt_chosen",
            "corrupt_rejected",
        )
        assert build_loss(LossConfig(name="fire_mpo", gamma=0.0)).corrupt_branches == ()
        assert build_loss(LossConfig(name="mdpo")).corrupt_branches == ("corrupt_chosen",)
