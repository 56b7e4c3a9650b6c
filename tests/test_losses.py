"""Each distillation loss against its closed form, gradients by finite differences, T² scaling, and the mode
behaviour of forward vs reverse KL."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.losses import chunked_kd_ce, chunked_kd_from_hidden, divergence, full_kd, hard_ce, mixed, topk_kd

P = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
Q = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)


def log(x):
    return torch.log(x)


def test_forward_and_reverse_kl_closed_form():
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.05)  # 0·log 0 = 0
    rev = 0.9 * math.log(0.9 / 0.5) + 0.05 * math.log(0.05 / 0.5) + 0.05 * math.log(0.05 / 1e-30)
    assert divergence(log(P), log(Q), "forward_kl").item() == pytest.approx(fwd, rel=1e-6)
    q2 = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    p2 = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    rev2 = sum(q * math.log(q / p) for p, q in zip(p2.tolist(), q2.tolist(), strict=True))
    assert divergence(log(p2), log(q2), "reverse_kl").item() == pytest.approx(rev2, rel=1e-6)
    assert rev > 0  # the zero-probability teacher token makes reverse KL blow up: that's the known asymmetry


def test_generalized_jsd_closed_form_and_endpoints():
    p, q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        expected = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
        assert divergence(p.log(), q.log(), "jsd", beta).item() == pytest.approx(expected.item(), rel=1e-6)
    # TRL's convention: beta 0 is forward KL, beta 1 is reverse KL (the bug where beta is reversed fails here)
    assert divergence(p.log(), q.log(), "jsd", 0.0) == pytest.approx(divergence(p.log(), q.log(), "forward_kl"))
    assert divergence(p.log(), q.log(), "jsd", 1.0) == pytest.approx(divergence(p.log(), q.log(), "reverse_kl"))
    assert divergence(p.log(), q.log(), "jsd", 0.5) <= math.log(2)


def test_full_kd_tempers_both_sides_and_scales_by_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    for temp in (1.0, 2.0, 4.0):
        p = torch.softmax(t / temp, -1)
        q = torch.softmax(s / temp, -1)
        expected = temp**2 * (p * (p.log() - q.log())).sum(-1).mean()
        assert full_kd(s, t, temp).item() == pytest.approx(expected.item(), rel=1e-5)
        one_sided = temp**2 * (p * (p.log() - torch.log_softmax(s, -1))).sum(-1).mean()
        if temp != 1.0:
            assert full_kd(s, t, temp).item() != pytest.approx(one_sided.item(), rel=1e-3)


def test_masked_positions_do_not_count():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    base = full_kd(s, t, 2.0, labels=labels)
    s2 = s.clone()
    s2[labels == -100] += 100 * torch.randn_like(s2[labels == -100])  # prompt/pad positions: anything goes
    assert full_kd(s2, t, 2.0, labels=labels).item() == pytest.approx(base.item(), rel=1e-6)
    with pytest.raises(ValueError, match="every position is masked"):
        full_kd(s, t, labels=torch.full((2, 5), -100))


def test_vocab_mismatch_is_refused():
    with pytest.raises(ValueError, match="vocabularies must match"):
        full_kd(torch.randn(3, 10), torch.randn(3, 12))


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_gradients_match_finite_differences(kind, beta):
    torch.manual_seed(0)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: full_kd(x, t, 1.7, kind, beta), (s,))
    top = torch.log_softmax(t, -1).topk(3)
    assert torch.autograd.gradcheck(lambda x: topk_kd(x, top.indices, top.values, 1.7, kind, beta), (s,))


def test_t_squared_keeps_soft_target_gradients_flat():
    torch.manual_seed(0)
    t = torch.randn(64, 50)
    t = t - t.mean(-1, keepdim=True)
    s0 = (t + 0.5 * torch.randn(64, 50)).detach()
    norms, unscaled = {}, {}
    for temp in (2.0, 4.0, 8.0, 16.0):
        s = s0.clone().requires_grad_(True)
        full_kd(s, t, temp).backward()
        norms[temp] = s.grad.norm().item()
        unscaled[temp] = norms[temp] / temp**2
    assert max(norms.values()) / min(norms.values()) < 1.5  # flat with T²
    assert unscaled[16.0] / unscaled[2.0] < 0.05  # without it the signal vanishes as 1/T²


def test_forward_kl_covers_both_modes_reverse_kl_commits_to_one():
    """A unimodal student (a discretised Gaussian over 41 tokens, mean and width learnable) fit to a bimodal
    teacher, both from the same start near one mode: forward KL moves its mean between the modes with a wide
    spread; reverse KL sits on that mode, at the textbook optimum KL = ln 2."""
    x = torch.linspace(-20, 20, 41)
    teacher = torch.logsumexp(torch.stack([-((x - 10) ** 2) / 8, -((x + 10) ** 2) / 8]), 0)
    fits = {}
    for kind in ("forward_kl", "reverse_kl"):
        mu = torch.tensor(6.0, requires_grad=True)
        log_sigma = torch.tensor(math.log(2.0), requires_grad=True)
        opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
        for _ in range(1500):
            opt.zero_grad()
            student = -((x - mu) ** 2) / (2 * log_sigma.exp() ** 2)
            loss = full_kd(student[None], teacher[None], 1.0, kind)
            loss.backward()
            opt.step()
        fits[kind] = (mu.item(), log_sigma.exp().item(), loss.item())
    (mu_f, sd_f, _), (mu_r, sd_r, loss_r) = fits["forward_kl"], fits["reverse_kl"]
    assert abs(mu_f) < 1.5 and sd_f > 7  # mass over both modes
    assert abs(mu_r - 10) < 0.5 and abs(sd_r - 2) < 0.5  # committed to one mode, with its width
    assert loss_r == pytest.approx(math.log(2), abs=1e-3)


def test_topk_bucket_is_exact_at_t1_and_renormalize_restricts():
    torch.manual_seed(0)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    logp = torch.log_softmax(t, -1)
    top = logp.topk(4)
    # closed form at T=1: KL between the coarsened distributions [top-k..., rest]
    q = torch.softmax(s, -1)
    p_c = torch.cat([top.values.exp(), 1 - top.values.exp().sum(-1, keepdim=True)], -1)
    q_top = q.gather(-1, top.indices)
    q_c = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = (p_c * (p_c.log() - q_c.log())).sum(-1).mean()
    assert topk_kd(s, top.indices, top.values, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    p_r = top.values.softmax(-1)
    q_r = q_top / q_top.sum(-1, keepdim=True)
    expected_r = (p_r * (p_r.log() - q_r.log())).sum(-1).mean()
    assert topk_kd(s, top.indices, top.values, 1.0, tail="renormalize").item() == pytest.approx(
        expected_r.item(), rel=1e-5
    )
    # all k = V: the stored top-k is the whole teacher, and the loss is the full one
    full = logp.topk(9)
    assert topk_kd(s, full.indices, full.values, 1.0).item() == pytest.approx(full_kd(s, t).item(), abs=1e-4)


def test_chunked_loss_equals_the_naive_one_with_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(30, 16, requires_grad=True)
    teacher = torch.randn(30, 40)
    labels = torch.randint(0, 40, (30,))
    labels[:7] = -100
    naive = full_kd(head(hidden), teacher, 2.0, "jsd", 0.4, labels=labels)
    g_naive = torch.autograd.grad(naive, [hidden, head.weight])
    for chunk in (4, 30, 1000):
        chunked = chunked_kd_from_hidden(hidden, head, teacher, labels, 2.0, "jsd", 0.4, chunk_size=chunk)
        assert chunked.item() == pytest.approx(naive.item(), rel=1e-5)
        g = torch.autograd.grad(chunked, [hidden, head.weight])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_naive, strict=True))
    top = torch.log_softmax(teacher, -1).topk(5)
    naive_k = topk_kd(head(hidden), top.indices, top.values, 2.0, labels=labels)
    chunked_k = chunked_kd_from_hidden(
        hidden, head, None, labels, 2.0, chunk_size=8, top_ids=top.indices, top_logprobs=top.values
    )
    assert chunked_k.item() == pytest.approx(naive_k.item(), rel=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_chunked_kd_and_ce_are_the_naive_ones_with_their_gradients(tail):
    """What the logit-KD trainer computes with kd.chunk_size > 0: top-k KD and cross-entropy from hidden states,
    a few positions' logits at a time, equal in value and gradient to both losses on the whole logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    top = torch.log_softmax(torch.randn(37, 300) * 2, -1).topk(8)
    labels = top.indices[:, 0].clone()
    labels[:9] = -100
    logits = head(hidden)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        naive_kd = topk_kd(logits, top.indices, top.values, 2.0, kind, 0.3, labels=labels, tail=tail)
        naive = naive_kd + hard_ce(logits, labels)
        g_naive = torch.autograd.grad(naive, [hidden, head.weight], retain_graph=True)
        for chunk in (5, 28, 4096):
            kd, ce = chunked_kd_ce(
                hidden, head, labels, None, top.indices, top.values, 2.0, kind, 0.3, tail, chunk_size=chunk
            )
            assert kd.item() == pytest.approx(naive_kd.item(), rel=1e-5, abs=1e-7)
            assert ce.item() == pytest.approx(hard_ce(logits, labels).item(), rel=1e-6)
            g = torch.autograd.grad(kd + ce, [hidden, head.weight])
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, g_naive, strict=True))
    with pytest.raises(ValueError, match="every position is masked"):
        chunked_kd_ce(hidden, head, torch.full((37,), -100), None, top.indices, top.values)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_ids_past_the_students_rows_join_the_tail(kind):
    """A teacher with more embedding rows than the student (R1-Distill-Qwen-7B: 152,064; a 1.5B student on the
    same tokenizer: 151,936) can put padding-row ids in its top-k. They cannot be gathered from the student, so
    they leave the top-k and their mass joins the bucket: the loss is exactly the one over the student's ids with
    the teacher's tail mass including theirs, finite in value and gradient."""
    torch.manual_seed(2)
    rows, k = 50, 6
    teacher = torch.log_softmax(torch.randn(10, rows + 4) * 3, -1)  # 4 rows the student lacks
    teacher[:, rows:] += 4  # ... that often make the top-k
    teacher = torch.log_softmax(teacher, -1)
    top = teacher.topk(k)
    assert (top.indices >= rows).any()
    student = torch.randn(10, rows, requires_grad=True)
    loss = topk_kd(student, top.indices, top.values, 2.0, kind, tail="bucket")
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # the closed form: per position, the student's ids among the top-k and one bucket, at T=1, then tempered alike
    q = torch.log_softmax(student.detach(), -1)
    expected = []
    for i in range(10):
        keep = top.indices[i] < rows
        t_top, s_top = top.values[i][keep], q[i][top.indices[i][keep]]
        t_c = torch.cat([t_top, torch.log1p(-t_top.exp().sum()).view(1)])
        s_c = torch.cat([s_top, torch.log1p(-s_top.exp().sum()).view(1)])
        expected.append(divergence(torch.log_softmax(t_c / 2, -1), torch.log_softmax(s_c / 2, -1), kind))
    assert loss.item() == pytest.approx(4 * torch.stack(expected).mean().item(), rel=1e-5)
    # renormalize: the same positions, restricted to the student's ids among the top-k
    renorm = topk_kd(student, top.indices, top.values, 2.0, kind, tail="renormalize")
    assert torch.isfinite(renorm) and torch.isfinite(torch.autograd.grad(renorm, student)[0]).all()


def test_mix_and_nan_refusal():
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert mixed(kd, ce, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    with pytest.raises(FloatingPointError, match="distillation loss is nan"):
        mixed(torch.tensor(float("nan")), ce, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        mixed(kd, ce, 1.5)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    assert hard_ce(logits, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100).item()
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_a_student_equal_to_the_teacher_pays_nothing_at_any_temperature(temperature, tail):
    """The top-k target at T != 1 must be the teacher itself: a student with the teacher's logits scores 0 with
    every tail setting and divergence, for an unsure teacher (2,000 tokens, top-16 ~ 2/3 of the mass), a one-hot
    one, and a Qwen-sized vocabulary. (The old bucket tempered only the teacher's leftover mass as one token:
    4.0 nats/token at T = 2 and 38 at T = 4 on the first.)"""
    torch.manual_seed(0)
    unsure = torch.randn(64, 2000) * 3
    one_hot = torch.randn(64, 512)
    one_hot[:, 7] += 12
    qwen = torch.randn(4, 151_936) * 3
    for logits in (unsure, one_hot, qwen):
        top = torch.log_softmax(logits, -1).topk(16)
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            loss = topk_kd(logits, top.indices, top.values, temperature, kind, labels=None, tail=tail)
            assert abs(loss.item()) < 1e-4, (kind, tuple(logits.shape), loss.item())
        # the stored form: fp16 logprobs, as the generate stage writes them
        loss16 = topk_kd(logits, top.indices, top.values.half(), temperature, tail=tail)
        assert abs(loss16.item()) < 2e-3, loss16.item()
    # and through the chunked path the train stage uses
    head = torch.nn.Linear(8, 2000, bias=False)
    hidden = torch.randn(40, 8)
    top = torch.log_softmax(head(hidden), -1).topk(16)
    chunked = chunked_kd_from_hidden(
        hidden,
        head,
        None,
        torch.zeros(40, dtype=torch.long),
        temperature,
        chunk_size=16,
        top_ids=top.indices,
        top_logprobs=top.values,
        tail=tail,
    )
    assert abs(chunked.item()) < 1e-4


def test_bucket_target_pulls_a_different_student_towards_the_teacher():
    """At T = 2 the bucket loss is positive for a student that differs, and gradient steps on the student's
    logits bring it to ~0 (its minimum is the teacher's top-k probabilities and tail mass)."""
    torch.manual_seed(1)
    teacher = torch.randn(16, 300) * 3
    top = torch.log_softmax(teacher, -1).topk(8)
    student = torch.zeros(16, 300, requires_grad=True)
    opt = torch.optim.Adam([student], lr=0.1)
    first = None
    for _ in range(400):
        opt.zero_grad()
        loss = topk_kd(student, top.indices, top.values, 2.0)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert first > 0.1 and loss.item() < 1e-3
    q = torch.softmax(student.detach(), -1)
    assert torch.allclose(q.gather(-1, top.indices), top.values.exp(), atol=5e-3)
