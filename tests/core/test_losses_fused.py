"""The fused path must equal the naive path: loss, parts and gradients, in float64.

The naive side gets logits h W^T + b built from the same hidden states, so both paths compute the
same function of (hidden states, lm_head weight, bias); gradients are compared w.r.t. all of them.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fire_mpo_core.losses import (
    BRANCHES,
    IGNORE_INDEX,
    LossConfig,
    fused_token_stats,
    pack_branch,
    pack_rows,
    preference_loss_from_hidden,
    preference_outputs_from_hidden,
    preference_outputs_from_logits,
    reference_logp_sums,
)

F64 = torch.float64
B, T, H, V = 3, 7, 6, 13
LOSS_CFGS = {
    "dpo": {"name": "dpo"},
    "mask_dpo": {"name": "mask_dpo"},
    "rrpo": {"name": "rrpo", "alpha": 0.3},
    "rrpo_spans": {"name": "rrpo", "alpha": 0.3, "rrpo_kl_on": "spans"},
    "mdpo": {"name": "mdpo"},
    "fire_mpo": {"name": "fire_mpo", "alpha": 0.3, "gamma": 0.7, "lambda_": 0.3},
    "fire_mpo_v1": {"name": "fire_mpo", "alpha": 0.3, "gamma": 0.7, "visual_direction": "v1"},
    "fire_mpo_v2": {"name": "fire_mpo", "alpha": 0.3, "gamma": 0.7, "visual_direction": "v2"},
}
CORRUPTED = {
    "some": [True, False, True],
    "none": [False, False, False],
}


class Problem:
    """Random hidden states, lm_head and labels; builds both paths' inputs."""

    def __init__(self, seed=0, bias=True, weight_grad=True, separate_reference_head=True):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(V, H, generator=g, dtype=F64).requires_grad_(weight_grad)
        self.bias = (
            torch.randn(V, generator=g, dtype=F64).requires_grad_(weight_grad) if bias else None
        )
        if separate_reference_head:
            self.ref_weight = self.weight.detach() + 0.3 * torch.randn(V, H, generator=g, dtype=F64)
            self.ref_bias = torch.zeros(V, dtype=F64)
        else:  # the reference is the same model with its adapter off: same lm_head
            self.ref_weight, self.ref_bias = None, None
        self.hidden, self.ref_hidden, self.labels, self.spans = {}, {}, {}, {}
        for k in BRANCHES:
            self.hidden[k] = torch.randn(B, T, H, generator=g, dtype=F64, requires_grad=True)
            self.ref_hidden[k] = torch.randn(B, T, H, generator=g, dtype=F64)
            lab = torch.randint(0, V, (B, T), generator=g)
            lab[:, :2] = IGNORE_INDEX  # prompt
            lab[1, -3:] = IGNORE_INDEX  # padding: N = 5 + 2 + 5 = 12 response rows per branch
            self.labels[k] = lab
            self.spans[k] = torch.rand(B, T, generator=g) < 0.4
            self.spans[k][:, 3] = True

    def _ref_head(self):
        if self.ref_weight is None:
            return self.weight.detach(), None if self.bias is None else self.bias.detach()
        return self.ref_weight, self.ref_bias

    def logits(self):
        w, b = self.weight, self.bias
        rw, rb = self._ref_head()
        pol = {k: h @ w.t() + (0 if b is None else b) for k, h in self.hidden.items()}
        ref = {k: h @ rw.t() + (0 if rb is None else rb) for k, h in self.ref_hidden.items()}
        return pol, ref

    def naive(self, cfg, has_corrupted):
        pol, ref = self.logits()
        return preference_outputs_from_logits(cfg, pol, ref, self.labels, self.spans, has_corrupted)

    def fused_branches(self):
        rw, rb = self._ref_head()
        out = {}
        for k in BRANCHES:
            rows, targets, pair = pack_rows(self.ref_hidden[k], self.labels[k])
            span_rows = self.spans[k][self.labels[k] != IGNORE_INDEX]
            ref_sum, ref_span = reference_logp_sums(
                rows, targets, pair, span_rows, B, rw, rb, chunk_size=4
            )
            out[k] = pack_branch(self.hidden[k], self.labels[k], self.spans[k], ref_sum, ref_span)
        return out

    def reference_kl_hidden(self, on):
        rows, _, _ = pack_rows(self.ref_hidden["clean_chosen"], self.labels["clean_chosen"])
        if on == "spans":
            rows = rows[self.spans["clean_chosen"][self.labels["clean_chosen"] != IGNORE_INDEX]]
        return rows

    def fused(self, cfg, has_corrupted, chunk_size, kl_on="spans"):
        return preference_outputs_from_hidden(
            cfg,
            self.fused_branches(),
            self.weight,
            has_corrupted,
            lm_head_bias=self.bias,
            reference_kl_hidden=self.reference_kl_hidden(kl_on),
            reference_lm_head_weight=self.ref_weight,
            reference_lm_head_bias=self.ref_bias,
            chunk_size=chunk_size,
        )

    def params(self):
        ps = [self.hidden[k] for k in BRANCHES]
        if self.weight.requires_grad:
            ps.append(self.weight)
            if self.bias is not None:
                ps.append(self.bias)
        return ps


def _grads(loss, params):
    # a fixed random cotangent per pair checks the whole Jacobian's action, not just sum()
    w = torch.linspace(0.3, 1.7, loss.shape[0], dtype=F64)
    grads = torch.autograd.grad((loss * w).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@pytest.mark.parametrize("loss_key", list(LOSS_CFGS))
@pytest.mark.parametrize("corrupted", list(CORRUPTED))
@pytest.mark.parametrize("weight_grad", [True, False], ids=["lm_head_trained", "lm_head_frozen"])
@pytest.mark.parametrize("chunk_size", [4, 5])  # N = 12 rows: 4 divides it, 5 does not
def test_fused_matches_naive(loss_key, corrupted, weight_grad, chunk_size):
    cfg = LossConfig(**LOSS_CFGS[loss_key], nll_weight=0.2)
    p = Problem(seed=list(LOSS_CFGS).index(loss_key), weight_grad=weight_grad)
    hc = torch.tensor(CORRUPTED[corrupted])
    naive = p.naive(cfg, hc)
    fused = p.fused(cfg, hc, chunk_size, kl_on=cfg.rrpo_kl_on if cfg.name == "rrpo" else "spans")
    for field in ("loss", "chosen_rewards", "rejected_rewards", "visual_margin", "kl_forward",
                  "kl_reverse", "nll"):  # fmt: skip
        torch.testing.assert_close(
            getattr(fused, field), getattr(naive, field), rtol=0, atol=1e-10, msg=field
        )
    for g_f, g_n in zip(_grads(fused.loss, p.params()), _grads(naive.loss, p.params())):
        torch.testing.assert_close(g_f, g_n, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 7, 12, 64])
def test_chunk_sizes_including_one_and_larger_than_n(chunk_size):
    cfg = LossConfig(name="fire_mpo", alpha=0.5, gamma=0.5)
    p = Problem(seed=3, bias=False, separate_reference_head=False)
    hc = torch.tensor([True, True, False])
    naive, fused = p.naive(cfg, hc), p.fused(cfg, hc, chunk_size)
    torch.testing.assert_close(fused.loss, naive.loss, rtol=0, atol=1e-10)
    for g_f, g_n in zip(_grads(fused.loss, p.params()), _grads(naive.loss, p.params())):
        torch.testing.assert_close(g_f, g_n, rtol=0, atol=1e-10)


def test_reference_hidden_for_all_rows_or_kl_rows_only():
    cfg = LossConfig(name="fire_mpo")
    p = Problem(seed=4)
    hc = torch.tensor([True, False, True])
    args = (cfg, p.fused_branches(), p.weight, hc)
    kw = {"lm_head_bias": p.bias, "reference_lm_head_weight": p.ref_weight,
          "reference_lm_head_bias": p.ref_bias, "chunk_size": 4}  # fmt: skip
    span_only = preference_loss_from_hidden(
        *args, reference_kl_hidden=p.reference_kl_hidden("spans"), **kw
    )
    all_rows = preference_loss_from_hidden(
        *args, reference_kl_hidden=p.reference_kl_hidden("all"), **kw
    )
    torch.testing.assert_close(span_only, all_rows, rtol=0, atol=0)
    torch.testing.assert_close(span_only, p.naive(cfg, hc).loss, rtol=0, atol=1e-10)


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_token_stats_gradcheck(weight_grad, bias):
    # torch.autograd.gradcheck compares the custom backward with finite differences of forward,
    # for all three outputs (token log-prob, forward KL, reverse KL) at once.
    g = torch.Generator().manual_seed(7)
    n, h, v = 7, 4, 9
    hidden = torch.randn(n, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=weight_grad)
    b = torch.randn(v, generator=g, dtype=F64, requires_grad=weight_grad) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    kl_rows = torch.tensor([True, False, True, True, False, False, True])
    ref_hidden = torch.randn(4, h, generator=g, dtype=F64)
    ref_weight = torch.randn(v, h, generator=g, dtype=F64)

    def fn(hidden, weight, *bias_arg):
        return fused_token_stats(
            hidden, weight, targets, bias=bias_arg[0] if bias_arg else None, kl_rows=kl_rows,
            reference_hidden=ref_hidden, reference_weight=ref_weight, chunk_size=3,
        )  # fmt: skip

    inputs = (hidden, weight) + ((b,) if b is not None else ())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_token_stats_values():
    # logits = h W^T with W = I (V = H = 3) and h = log of a distribution: exact log-probs and KL
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], dtype=F64)
    uniform = torch.full((2, 3), 1 / 3, dtype=F64)
    eye = torch.eye(3, dtype=F64)
    logp, kl_f, kl_r = fused_token_stats(
        probs.log(), eye, torch.tensor([0, 2]), kl_rows=torch.tensor([True, False]),
        reference_hidden=uniform.log()[:1], chunk_size=1,
    )  # fmt: skip
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.25], dtype=F64).log())
    # KL(U || [1/2,1/4,1/4]) = 1/3 ln(32/27); KL([1/2,1/4,1/4] || U) = 1/2 ln(9/8); row 1: no KL
    expected_f = torch.tensor([torch.tensor(32 / 27).log().item() / 3, 0.0], dtype=F64)
    expected_r = torch.tensor([torch.tensor(9 / 8).log().item() / 2, 0.0], dtype=F64)
    torch.testing.assert_close(kl_f, expected_f)
    torch.testing.assert_close(kl_r, expected_r)


def test_reference_sums_match_naive_gather():
    p = Problem(seed=5)
    rw, rb = p._ref_head()
    for k in BRANCHES:
        lp = torch.log_softmax(p.ref_hidden[k] @ rw.t() + rb, -1)
        mask = p.labels[k] != IGNORE_INDEX
        tok = lp.gather(-1, p.labels[k].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected_full = torch.where(mask, tok, 0).sum(-1)
        expected_span = torch.where(mask & p.spans[k], tok, 0).sum(-1)
        rows, targets, pair = pack_rows(p.ref_hidden[k], p.labels[k])
        full, span = reference_logp_sums(rows, targets, pair, p.spans[k][mask], B, rw, rb, 3)
        torch.testing.assert_close(full, expected_full, rtol=0, atol=1e-12)
        torch.testing.assert_close(span, expected_span, rtol=0, atol=1e-12)


def test_reference_side_gets_no_gradient():
    p = Problem(seed=6, separate_reference_head=False)
    cfg = LossConfig(name="fire_mpo", alpha=1.0)
    hc = torch.tensor([True, False, True])
    ref_kl = p.reference_kl_hidden("spans").clone().requires_grad_(True)
    loss = preference_loss_from_hidden(
        cfg, p.fused_branches(), p.weight, hc, lm_head_bias=p.bias, reference_kl_hidden=ref_kl
    )
    loss.sum().backward()
    assert ref_kl.grad is None
    assert p.weight.grad is not None and bool(torch.isfinite(p.weight.grad).all())


def test_empty_spans_are_finite_on_the_fused_path():
    p = Problem(seed=8)
    p.spans = {k: torch.zeros_like(v) for k, v in p.spans.items()}
    cfg = LossConfig(name="fire_mpo")
    hc = torch.tensor([True, False, True])
    fused = p.fused(cfg, hc, 4)
    torch.testing.assert_close(fused.loss, p.naive(cfg, hc).loss, rtol=0, atol=1e-10)
    assert bool(torch.isfinite(torch.stack(_grads(fused.loss, p.params()[:4]))).all())


def test_missing_reference_kl_hidden_is_an_error():
    p = Problem(seed=9)
    with pytest.raises(ValueError, match="reference_kl_hidden"):
        preference_loss_from_hidden(
            LossConfig(name="rrpo"), p.fused_branches(), p.weight, torch.tensor([False] * 3)
        )


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_never_materialises_rows_times_vocab(weight_grad):
    # N = 4 pairs x 32 response tokens = 128 rows per branch, V = 500, H = 8, chunk 16:
    # the naive path's [N, V] is 64,000 elements; the fused one stays at ~2 chunks of [16, V]
    # (the logits and a same-sized temporary) or the [V, H] weight gradient.
    n_pairs, t_len, vocab, h_dim, chunk = 4, 32, 500, 8, 16
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, h_dim, generator=g, requires_grad=weight_grad)
    branches = {}
    for k in BRANCHES:
        hidden = torch.randn(n_pairs, t_len, h_dim, generator=g, requires_grad=True)
        labels = torch.randint(0, vocab, (n_pairs, t_len), generator=g)
        spans = torch.rand(n_pairs, t_len, generator=g) < 0.5
        branches[k] = pack_branch(hidden, labels, spans, torch.zeros(n_pairs), torch.zeros(n_pairs))
    cc = branches["clean_chosen"]
    ref_kl = torch.randn(int(cc.span_mask.sum()), h_dim, generator=g)
    hc = torch.tensor([True, False, True, True])
    with _MaxNumel() as probe:
        loss = preference_loss_from_hidden(
            LossConfig(name="fire_mpo", chunk_size=chunk), branches, weight, hc,
            reference_kl_hidden=ref_kl,
        )  # fmt: skip
        loss.sum().backward()
    assert probe.max_numel <= max(2 * chunk * vocab, vocab * h_dim)
    assert probe.max_numel < n_pairs * t_len * vocab / 2


@pytest.mark.parametrize(
    ("dtype", "tol", "cos_tol"), [(torch.float32, 1e-5, 1e-10), (torch.bfloat16, 5e-3, 1e-4)]
)
def test_low_precision_inputs_follow_the_float64_result(dtype, tol, cos_tol):
    # float32 / bfloat16 hidden states and lm_head (bf16 is the GPU training dtype): softmax
    # statistics are accumulated in float32, so the loss stays close to the float64 naive value.
    p = Problem(seed=10, bias=False, weight_grad=False, separate_reference_head=False)
    cfg = LossConfig(name="fire_mpo", alpha=0.5, gamma=0.5)
    hc = torch.tensor([True, False, True])
    naive = p.naive(cfg, hc).loss
    branches = {
        k: replace(br, hidden=br.hidden.detach().to(dtype).requires_grad_(True))
        for k, br in p.fused_branches().items()
    }
    fused = preference_loss_from_hidden(
        cfg, branches, p.weight.detach().to(dtype), hc,
        reference_kl_hidden=p.reference_kl_hidden("spans").to(dtype), chunk_size=5,
    )  # fmt: skip
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), naive.detach(), rtol=tol, atol=tol)
    low = torch.autograd.grad(fused.sum(), [branches[k].hidden for k in BRANCHES])
    high = torch.autograd.grad(naive.sum(), [p.hidden[k] for k in BRANCHES])
    for k, g_low, g_high in zip(BRANCHES, low, high):
        assert g_low.dtype == dtype
        rows = g_high[p.labels[k] != IGNORE_INDEX]  # [N, H], the packed rows' gradient
        cos = torch.nn.functional.cosine_similarity(g_low.double().flatten(), rows.flatten(), dim=0)
        assert cos > 1 - cos_tol
