import dataclasses
import math
import operator

import pytest
import torch

from tgdpo_ray.config.job import LossSection
from tgdpo_ray.kernels.logprobs import token_logps
from tgdpo_ray.kernels.losses import (LOSSES, MAX_KEYS, WEIGHT_BINS, WEIGHT_RANGE, DPOLoss, IPOLoss, PairBatch, SFTLoss,
                                      SimPOLoss, TGDPOLoss, build_loss, finalize_metrics, metric_sums,
                                      shuffled_within_answers)


def reference_token_logps(logits, labels):
    valid = labels != -100
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logps, torch.zeros_like(logps))


def log1p_exp_neg(z):
    # -logsigmoid(z) written out by hand
    return math.log(1.0 + math.exp(-z))


def make_logits_and_labels(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 11, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    labels[0, 0] = -100
    labels[1, 3] = -100
    labels[1, 4] = -100
    return logits, labels


# ---------------------------------------------------------------- token_logps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 10, 1024])
def test_token_logps_matches_reference(dtype, chunk_size):
    logits, labels = make_logits_and_labels(dtype)
    got = token_logps(logits, labels, chunk_size=chunk_size)
    want = reference_token_logps(logits, labels)
    assert got.dtype == torch.float32
    assert got.shape == labels.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got[labels == -100] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, 1024])
def test_token_logps_gradient_matches_reference(chunk_size):
    logits, labels = make_logits_and_labels(torch.float32)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))

    x = logits.clone().requires_grad_(True)
    (token_logps(x, labels, chunk_size=chunk_size) * upstream).sum().backward()

    y = logits.clone().requires_grad_(True)
    (reference_token_logps(y, labels) * upstream).sum().backward()

    assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-5)
    assert (x.grad[labels == -100] == 0).all()


def test_token_logps_bf16_gradient_dtype_and_value():
    logits, labels = make_logits_and_labels(torch.bfloat16)
    x = logits.clone().requires_grad_(True)
    token_logps(x, labels, chunk_size=3).sum().backward()
    assert x.grad.dtype == torch.bfloat16

    y = logits.float().requires_grad_(True)
    reference_token_logps(y, labels).sum().backward()
    assert torch.allclose(x.grad.float(), y.grad, atol=1e-2)


# ---------------------------------------------------------------- hand-computed values

# batch 1, seq 3; the last position is masked and holds junk.
MASK = torch.tensor([[1, 1, 0]])
POLICY_W = torch.tensor([[-1.0, -2.0, 99.0]])
REF_W = torch.tensor([[-1.5, -2.5, -7.0]])
POLICY_L = torch.tensor([[-3.0, -1.0, 5.0]])
REF_L = torch.tensor([[-2.0, -0.5, 0.0]])
GUIDE_W = torch.tensor([[-0.5, -3.5, 40.0]])
GUIDE_L = torch.tensor([[-1.0, -0.5, -40.0]])
HAND_BATCH = PairBatch(POLICY_W, POLICY_L, MASK, MASK, ref_chosen_logps=REF_W, ref_rejected_logps=REF_L,
                 guidance_chosen_logps=GUIDE_W, guidance_rejected_logps=GUIDE_L)


def test_dpo_hand_computed():
    beta = 0.1
    sum_w = (-1.0 - -1.5) + (-2.0 - -2.5)  # 1.0
    sum_l = (-3.0 - -2.0) + (-1.0 - -0.5)  # -1.5
    expected = log1p_exp_neg(beta * (sum_w - sum_l))

    out = DPOLoss(beta=beta)(HAND_BATCH)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(beta * sum_w, rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(beta * sum_l, rel=1e-6)


def test_ipo_hand_computed():
    beta = 0.1
    mean_w = ((-1.0 - -1.5) + (-2.0 - -2.5)) / 2  # 0.5
    mean_l = ((-3.0 - -2.0) + (-1.0 - -0.5)) / 2  # -0.75
    expected = (mean_w - mean_l - 1 / (2 * beta)) ** 2  # (1.25 - 5)^2

    out = IPOLoss(beta=beta)(HAND_BATCH)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(14.0625)


def test_simpo_hand_computed():
    beta, gamma = 2.0, 0.5
    mean_w = (-1.0 + -2.0) / 2
    mean_l = (-3.0 + -1.0) / 2
    expected = log1p_exp_neg(beta * mean_w - beta * mean_l - gamma)

    out = SimPOLoss(beta=beta, gamma=gamma)(PairBatch(POLICY_W, POLICY_L, MASK, MASK))
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(beta * mean_w, rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(beta * mean_l, rel=1e-6)


def test_sft_is_the_chosen_answers_mean_token_nll_and_never_trains_the_rejected():
    chosen = POLICY_W.clone().requires_grad_(True)
    rejected = POLICY_L.clone().requires_grad_(True)
    out = SFTLoss()(PairBatch(chosen, rejected, MASK, MASK))
    assert out.losses.item() == pytest.approx(-(-1.0 + -2.0) / 2, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx((-1.0 + -2.0) / 2, rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx((-3.0 + -1.0) / 2, rel=1e-6)
    out.losses.sum().backward()
    assert rejected.grad is None  # the rejected answer is not even in the graph
    assert torch.allclose(chosen.grad, torch.where(MASK.bool(), -0.5, 0.0))  # -1 / answer tokens, 0 off them
    assert build_loss(LossSection(type="sft")) == SFTLoss()


def test_tgdpo_hand_computed():
    beta, alpha = 0.1, 0.5
    lw = [-1.0 - -1.5, -2.0 - -2.5]
    ll = [-3.0 - -2.0, -1.0 - -0.5]
    rw = [beta * (-0.5 - -1.5), beta * (-3.5 - -2.5)]
    rl = [beta * (-1.0 - -2.0), beta * (-0.5 - -0.5)]
    ww = [beta * (1 + alpha * r) for r in rw]  # [0.105, 0.095]
    wl = [beta * (1 - alpha * r) for r in rl]  # [0.095, 0.1]
    z = sum(w * l for w, l in zip(ww, lw)) - sum(w * l for w, l in zip(wl, ll))
    assert z == pytest.approx(0.245)

    out = TGDPOLoss(beta=beta, alpha=alpha)(HAND_BATCH)
    assert out.losses.item() == pytest.approx(log1p_exp_neg(z), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(beta * sum(lw), rel=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(beta * sum(ll), rel=1e-6)
    assert out.stats["chosen_weight_mean"].item() == pytest.approx(sum(ww) / 2, rel=1e-6)
    assert out.stats["rejected_weight_mean"].item() == pytest.approx(sum(wl) / 2, rel=1e-6)
    assert out.stats["negative_weight_fraction"].item() == 0.0
    # What carries z: DPO's contrast, and the guidance's part alpha beta (sum r_w l_w + sum r_l l_l).
    z_dpo = beta * (sum(lw) - sum(ll))
    z_guidance = alpha * beta * (sum(r * l for r, l in zip(rw, lw)) + sum(r * l for r, l in zip(rl, ll)))
    assert (z_dpo, z_guidance) == (pytest.approx(0.25), pytest.approx(-0.005))
    assert out.stats["z_dpo_sum"].item() == pytest.approx(z_dpo, rel=1e-6)
    assert out.stats["z_guidance_sum"].item() == pytest.approx(z_guidance, rel=1e-5)
    assert out.stats["weight_sum_gap_sum"].item() == pytest.approx((sum(ww) - sum(wl)) / beta, rel=1e-5)  # 0.05
    assert out.stats["weight_max"].item() == pytest.approx(max(ww + wl) / beta, rel=1e-6)  # 1.05


def shifted(batch: PairBatch, delta: float) -> PairBatch:
    """Every answer token's policy log-prob (so its log-ratio) moved by delta."""
    return dataclasses.replace(batch, policy_chosen_logps=batch.policy_chosen_logps + delta,
                               policy_rejected_logps=batch.policy_rejected_logps + delta)


def z_of(out) -> torch.Tensor:
    return out.stats["z_dpo_sum"] + out.stats["z_guidance_sum"]


def test_a_uniform_shift_moves_z_by_the_weight_sum_gap_unless_the_guidance_is_centred():
    beta, alpha, delta = 0.1, 0.5, -0.7
    batch = random_batch(3, batch=1)
    equal = torch.ones_like(batch.chosen_mask)  # both answers of the same length
    batch = dataclasses.replace(batch, chosen_mask=equal, rejected_mask=equal)
    authors = TGDPOLoss(beta=beta, alpha=alpha)
    before, after = authors(batch), authors(shifted(batch, delta))
    gap = before.stats["weight_sum_gap_sum"].item()
    assert abs(gap) > 0.01  # the guidance's weights do not sum alike on the two answers
    assert (z_of(after) - z_of(before)).item() == pytest.approx(delta * beta * gap, rel=1e-4)
    # DPO's contrast does not move on equal lengths: all of the move is the guidance's part.
    assert after.stats["z_dpo_sum"].item() == pytest.approx(before.stats["z_dpo_sum"].item(), abs=1e-6)

    centred = TGDPOLoss(beta=beta, alpha=alpha, center_guidance=True)
    before, after = centred(batch), centred(shifted(batch, delta))
    assert before.stats["weight_sum_gap_sum"].item() == pytest.approx(0.0, abs=1e-6)
    assert z_of(after).item() == pytest.approx(z_of(before).item(), abs=1e-6)
    assert after.losses.item() == pytest.approx(before.losses.item(), abs=1e-6)
    # Each answer's weights sum to beta times its length, as in DPO, whatever the lengths.
    out = centred(random_batch(4))
    assert out.stats["chosen_weight_sum"].item() == pytest.approx(beta * out.stats["chosen_tokens"].item(), rel=1e-5)
    assert out.stats["rejected_weight_sum"].item() == pytest.approx(beta * out.stats["rejected_tokens"].item(),
                                                                    rel=1e-5)
    assert not torch.equal(centred(batch).losses, authors(batch).losses)  # the option is not a no-op


def test_shuffling_moves_each_answers_rewards_within_its_tokens_and_keeps_their_sums():
    values = torch.arange(12.0).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]).bool()
    shuffled = shuffled_within_answers(values, mask)
    for row in range(2):  # the same numbers on the answer's tokens, the rest untouched
        assert sorted(shuffled[row][mask[row]].tolist()) == sorted(values[row][mask[row]].tolist())
        assert torch.equal(shuffled[row][~mask[row]], values[row][~mask[row]])
    assert not torch.equal(shuffled, values)
    assert torch.equal(shuffled_within_answers(values, mask), shuffled)  # a batch is shuffled the same way each time

    beta, alpha = 0.1, 0.5
    batch = random_batch(5, batch=3, seq=8)
    authors, control = TGDPOLoss(beta=beta, alpha=alpha), TGDPOLoss(beta=beta, alpha=alpha, shuffle_guidance=True)
    plain, moved = authors(batch), control(batch)
    # Same weights per answer (sums, so the weight-sum gap), placed elsewhere: z changes.
    for key in ("chosen_weight_sum", "rejected_weight_sum", "weight_sum_gap_sum", "weight_max"):
        assert moved.stats[key].item() == pytest.approx(plain.stats[key].item(), rel=1e-5)
    assert not torch.allclose(moved.losses, plain.losses)


# ---------------------------------------------------------------- random-input properties


def random_batch(seed, batch=4, seq=6) -> PairBatch:
    gen = torch.Generator().manual_seed(seed)

    def logps():
        return -torch.rand(batch, seq, generator=gen) * 5

    chosen_mask = (torch.rand(batch, seq, generator=gen) > 0.3).long()
    rejected_mask = (torch.rand(batch, seq, generator=gen) > 0.3).long()
    chosen_mask[:, 0] = 1  # every response has at least one token
    rejected_mask[:, 0] = 1
    return PairBatch(
        policy_chosen_logps=logps(),
        policy_rejected_logps=logps(),
        ref_chosen_logps=logps(),
        ref_rejected_logps=logps(),
        guidance_chosen_logps=logps(),
        guidance_rejected_logps=logps(),
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
    )


def logps_fields(batch: PairBatch) -> list[str]:
    return [name for name, value in vars(batch).items() if name.endswith("logps") and value is not None]


def test_tgdpo_alpha_zero_equals_dpo():
    for seed in range(5):
        b = random_batch(seed)
        dpo = DPOLoss(beta=0.3)(b)
        tg = TGDPOLoss(beta=0.3, alpha=0.0)(b)
        assert torch.allclose(tg.losses, dpo.losses, atol=1e-6, rtol=0)
        assert torch.allclose(tg.chosen_rewards, dpo.chosen_rewards, atol=1e-6, rtol=0)
        assert torch.allclose(tg.rejected_rewards, dpo.rejected_rewards, atol=1e-6, rtol=0)


def test_tgdpo_gradients_reach_only_policy():
    b = random_batch(3)
    leaves = {k: getattr(b, k).clone().requires_grad_(True) for k in logps_fields(b)}
    out = TGDPOLoss(beta=0.1, alpha=0.5)(dataclasses.replace(b, **leaves))
    out.losses.sum().backward()

    for key in ("ref_chosen_logps", "ref_rejected_logps", "guidance_chosen_logps", "guidance_rejected_logps"):
        grad = leaves[key].grad
        assert grad is None or (grad == 0).all(), key
    for key, mask in (("policy_chosen_logps", b.chosen_mask), ("policy_rejected_logps", b.rejected_mask)):
        grad = leaves[key].grad
        assert grad is not None
        assert (grad[mask.bool()] != 0).all(), key
        assert (grad[~mask.bool()] == 0).all(), key
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad


def run_all_losses(b, clamp_weights=False):
    return {
        name: build_loss(LossSection(type=name, beta=0.2, alpha=0.7, simpo_gamma=0.3, clamp_weights=clamp_weights))(b)
        for name in LOSSES
    }


@pytest.mark.parametrize("clamp_weights", [False, True])
def test_masked_positions_change_nothing(clamp_weights):
    clean = random_batch(7)
    dirty = dataclasses.replace(clean)
    gen = torch.Generator().manual_seed(99)
    for key in logps_fields(clean):
        mask = (clean.chosen_mask if "chosen" in key else clean.rejected_mask).bool()
        garbage = torch.randn(mask.shape, generator=gen) * 1e4
        setattr(dirty, key, torch.where(mask, getattr(clean, key), garbage))
        assert not torch.equal(getattr(dirty, key), getattr(clean, key))

    clean_out = run_all_losses(clean, clamp_weights)
    dirty_out = run_all_losses(dirty, clamp_weights)
    for name in LOSSES:
        a, b = clean_out[name], dirty_out[name]
        assert torch.equal(a.losses, b.losses), name
        assert torch.equal(a.chosen_rewards, b.chosen_rewards), name
        assert torch.equal(a.rejected_rewards, b.rejected_rewards), name
        assert a.stats.keys() == b.stats.keys()
        for key in a.stats:
            assert torch.equal(a.stats[key], b.stats[key]), (name, key)


def test_clamp_weights_changes_loss_but_not_negative_fraction():
    beta, alpha = 0.1, 2.0
    mask = torch.tensor([[1]])
    policy_w, ref_w, guide_w = torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[-10.0]])
    policy_l, ref_l, guide_l = torch.tensor([[-0.5]]), torch.tensor([[0.0]]), torch.tensor([[0.0]])
    # chosen weight = 0.1 * (1 + 2 * 0.1 * -10) = -0.1 ; rejected weight = 0.1
    w_w = beta * (1 + alpha * beta * (-10.0 - 0.0))
    w_l = beta * (1 - alpha * beta * (0.0 - 0.0))
    z_free = w_w * 0.5 - w_l * -0.5  # 0.0
    z_clamped = 0.0 * 0.5 - w_l * -0.5  # 0.05

    batch = PairBatch(policy_w, policy_l, mask, mask, ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
                      guidance_chosen_logps=guide_w, guidance_rejected_logps=guide_l)
    free = TGDPOLoss(beta=beta, alpha=alpha, clamp_weights=False)(batch)
    clamped = TGDPOLoss(beta=beta, alpha=alpha, clamp_weights=True)(batch)

    assert free.losses.item() == pytest.approx(log1p_exp_neg(z_free), rel=1e-6)
    assert clamped.losses.item() == pytest.approx(log1p_exp_neg(z_clamped), rel=1e-6)
    assert free.losses.item() != pytest.approx(clamped.losses.item())
    assert free.stats["negative_weight_fraction"].item() == pytest.approx(0.5)
    assert clamped.stats["negative_weight_fraction"].item() == pytest.approx(0.5)
    assert free.stats["chosen_weight_mean"].item() == pytest.approx(w_w)
    assert clamped.stats["chosen_weight_mean"].item() == 0.0


# ---------------------------------------------------------------- build_loss and metrics


def test_build_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="bogus") as info:
        build_loss(LossSection.model_construct(type="bogus"))
    for name in LOSSES:
        assert name in str(info.value)


def test_build_loss_simpo_needs_no_reference():
    b = random_batch(0)
    slim = PairBatch(b.policy_chosen_logps, b.policy_rejected_logps, b.chosen_mask, b.rejected_mask)
    out = build_loss(LossSection(type="simpo", beta=2.0, alpha=0.0, simpo_gamma=0.5))(slim)
    direct = SimPOLoss(beta=2.0, gamma=0.5)(slim)
    assert torch.equal(out.losses, direct.losses)


def batch_means(out):
    """Means over the pairs of one batch, plus every scalar stat: what the accumulated sums must come to."""
    chosen = out.chosen_rewards.float()
    rejected = out.rejected_rewards.float()
    metrics = {
        "loss": out.losses.detach().float().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
    }
    for key, value in out.stats.items():
        if value.dim() == 0:
            metrics[key] = value.item()
    return metrics


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_metric_sums_over_micro_batches_match_full_batch(loss_type):
    # Large alpha so some tgdpo weights go negative and the fraction is non-trivial.
    loss = build_loss(LossSection(type=loss_type, beta=0.5, alpha=3.0, simpo_gamma=0.3, clamp_weights=False))
    full = random_batch(11, batch=5)
    first = PairBatch(**{k: v[:2] for k, v in vars(full).items() if v is not None})
    second = PairBatch(**{k: v[2:] for k, v in vars(full).items() if v is not None})

    sums = {}
    for micro in (first, second):
        for key, value in metric_sums(loss(micro)).items():
            combine = max if key in MAX_KEYS else operator.add
            sums[key] = combine(sums[key], float(value)) if key in sums else float(value)
    accumulated = finalize_metrics(sums)

    expected = batch_means(loss(full))
    assert sums["pairs"] == 5
    for key in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        assert accumulated[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    if loss_type == "tgdpo":
        for key in ("chosen_weight_mean", "rejected_weight_mean", "negative_weight_fraction", "weight_max"):
            assert accumulated[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        for key in ("z_dpo", "z_guidance", "weight_sum_gap"):  # means over the pairs
            assert accumulated[key] == pytest.approx(expected[f"{key}_sum"] / 5, rel=1e-5, abs=1e-6), key
        assert 0.0 < expected["negative_weight_fraction"] < 1.0
    else:
        assert "negative_weight_fraction" not in accumulated


def test_tgdpo_weight_histograms_are_histc_of_the_answer_tokens():
    """The histograms count each answer token's weight (in units of beta) as torch.histc would on the masked weights,
    the clamp to the range included; padding positions and NaN weights (-inf log-probs in both scorers) count
    nowhere."""
    loss = build_loss(LossSection(type="tgdpo", beta=0.5, alpha=3.0, simpo_gamma=0.3, clamp_weights=False))
    batch = random_batch(5, batch=6, seq=9)
    batch.guidance_chosen_logps[0, 0] = batch.ref_chosen_logps[0, 0] = -math.inf  # an answer token: NaN weight
    out = loss(batch)
    chosen_rewards, rejected_rewards = loss.token_rewards(batch)
    for side, weights, mask in (("chosen", 0.5 * (1 + 3.0 * chosen_rewards), batch.chosen_mask.bool()),
                                ("rejected", 0.5 * (1 - 3.0 * rejected_rewards), batch.rejected_mask.bool())):
        expected = torch.histc((weights[mask] / 0.5).clamp(*WEIGHT_RANGE), bins=WEIGHT_BINS, min=WEIGHT_RANGE[0],
                               max=WEIGHT_RANGE[1])
        assert torch.equal(out.stats[f"{side}_weight_histogram"], expected), side
        assert out.stats[f"{side}_weight_histogram"].sum() == (mask & ~weights.isnan()).sum()


def test_the_guarded_form_pushes_every_chosen_token_up_and_every_rejected_one_down_with_dpos_weight_sums():
    beta = 0.1
    batch = random_batch(9, batch=4, seq=8)
    # Guidance far from the reference, so that some authors' weights are negative.
    batch = dataclasses.replace(batch, guidance_chosen_logps=batch.guidance_chosen_logps * 8,
                                guidance_rejected_logps=batch.guidance_rejected_logps * 8)
    assert TGDPOLoss(beta=beta, alpha=0.5)(batch).stats["negative_weights"].item() > 0
    guarded = TGDPOLoss(beta=beta, alpha=0.5, center_guidance=True, clamp_weights=True, normalize_weights=True)
    out = guarded(batch)
    assert out.stats["chosen_weight_sum"].item() == pytest.approx(beta * out.stats["chosen_tokens"].item(), rel=1e-5)
    assert out.stats["rejected_weight_sum"].item() == pytest.approx(beta * out.stats["rejected_tokens"].item(),
                                                                    rel=1e-5)
    assert out.stats["weight_sum_gap_sum"].item() == pytest.approx(
        (out.stats["chosen_tokens"] - out.stats["rejected_tokens"]).item(), rel=1e-5)
    # The gradient of the loss: down on every chosen token's log-prob (it rises), up on every rejected one's.
    chosen = batch.policy_chosen_logps.clone().requires_grad_()
    rejected = batch.policy_rejected_logps.clone().requires_grad_()
    guarded(dataclasses.replace(batch, policy_chosen_logps=chosen, policy_rejected_logps=rejected)).losses.sum() \
        .backward()
    chosen_mask, rejected_mask = batch.chosen_mask.bool(), batch.rejected_mask.bool()
    assert (chosen.grad[chosen_mask] <= 0).all() and (rejected.grad[rejected_mask] >= 0).all()
    assert (chosen.grad[~chosen_mask] == 0).all() and chosen.grad[chosen_mask].abs().max() > 0
