"""Token log-probs and the DPO family of preference losses (DPO, IPO, SimPO, TGDPO).

Every loss takes per-token log-probs [batch, seq] already gathered at the label ids,
plus 0/1 (or bool) response masks [batch, seq]. Masked positions are removed with
torch.where (not multiplication) so that whatever they hold cannot leak into the
loss, the rewards or the gradients.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Token weights are histogrammed in units of beta (1 + alpha r_hat): 40 bins over [-1, 3], outliers in the edges.
WEIGHT_BINS, WEIGHT_RANGE = 40, (-1.0, 3.0)


# ---------------------------------------------------------------------------
# Per-token log-probs, chunked so no full fp32 [tokens x vocab] tensor exists.
# ---------------------------------------------------------------------------


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk_size):
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        # Masked rows gather index 0 (any valid index) and are zeroed afterwards.
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))

        num_tokens = flat_logits.shape[0]
        logsumexp = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        label_logits = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk = flat_logits[start:end].float()  # only this chunk is upcast
            logsumexp[start:end] = torch.logsumexp(chunk, dim=-1)
            label_logits[start:end] = chunk.gather(-1, safe_labels[start:end, None]).squeeze(-1)

        logps = torch.where(valid, label_logits - logsumexp, torch.zeros_like(logsumexp))
        ctx.save_for_backward(logits, labels, logsumexp)
        ctx.chunk_size = chunk_size
        return logps.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, labels, logsumexp = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
        # Zeroing g on masked rows makes their whole gradient row zero.
        g = torch.where(valid, grad_output.reshape(-1).float(), torch.zeros_like(logsumexp))

        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, flat_logits.shape[0], chunk_size):
            end = min(start + chunk_size, flat_logits.shape[0])
            g_chunk = g[start:end, None]
            # d logp[label] / d logits = onehot(label) - softmax(logits)
            probs = torch.exp(flat_logits[start:end].float() - logsumexp[start:end, None])
            grad_chunk = -probs * g_chunk
            grad_chunk.scatter_add_(-1, safe_labels[start:end, None], g_chunk)
            grad_logits[start:end] = grad_chunk.to(logits.dtype)

        return grad_logits.view(logits.shape), None, None


def token_logps(logits, labels, chunk_size=1024):
    """Log-prob of each label under `logits` ([..., vocab], [...]); float32, 0.0 where label == -100."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return _ChunkedTokenLogps.apply(logits, labels, chunk_size)


# ---------------------------------------------------------------------------
# Preference losses.
# ---------------------------------------------------------------------------


class LossOutput(NamedTuple):
    losses: torch.Tensor  # [batch] per-pair losses
    chosen_rewards: torch.Tensor  # [batch], detached
    rejected_rewards: torch.Tensor  # [batch], detached
    stats: dict  # str -> scalar tensor or [batch] tensor


def _masked(values, mask):
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _masked_sum(values, mask):
    return _masked(values, mask).sum(-1)


def _masked_mean(values, mask):
    # clamp avoids 0/0 for an (invalid) empty response; the sum is 0 there anyway.
    return _masked_sum(values, mask) / mask.bool().sum(-1).clamp(min=1)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_mask,
    rejected_mask,
    beta=0.1,
):
    chosen_logratio = _masked_sum(policy_chosen_logps - ref_chosen_logps.detach(), chosen_mask)
    rejected_logratio = _masked_sum(policy_rejected_logps - ref_rejected_logps.detach(), rejected_mask)
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return LossOutput(
        losses,
        (beta * chosen_logratio).detach(),
        (beta * rejected_logratio).detach(),
        {},
    )


def ipo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_mask,
    rejected_mask,
    beta=0.1,
):
    # IPO as in TRL: the log-ratios are averaged over response tokens.
    chosen_mean = _masked_mean(policy_chosen_logps - ref_chosen_logps.detach(), chosen_mask)
    rejected_mean = _masked_mean(policy_rejected_logps - ref_rejected_logps.detach(), rejected_mask)
    losses = (chosen_mean - rejected_mean - 1.0 / (2.0 * beta)) ** 2

    # Rewards stay the DPO-style summed implicit rewards, same as every other loss.
    chosen_rewards = beta * _masked_sum(policy_chosen_logps - ref_chosen_logps, chosen_mask)
    rejected_rewards = beta * _masked_sum(policy_rejected_logps - ref_rejected_logps, rejected_mask)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), {})


def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_mask,
    rejected_mask,
    beta=2.0,
    gamma=0.5,
):
    # Reference-free: the reward is the length-normalised policy log-prob.
    chosen_rewards = beta * _masked_mean(policy_chosen_logps, chosen_mask)
    rejected_rewards = beta * _masked_mean(policy_rejected_logps, rejected_mask)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), {})


def implicit_token_rewards(guidance_logps, ref_logps, beta):
    """Token-level guidance rewards r_hat = beta * (log pi_g - log pi_ref): the paper's implicit form, a constant."""
    with torch.no_grad():
        return beta * (guidance_logps - ref_logps)


def tgdpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    guidance_chosen_logps,
    guidance_rejected_logps,
    chosen_mask,
    rejected_mask,
    beta=0.1,
    alpha=0.5,
    clamp_weights=False,
):
    chosen_token_rewards = implicit_token_rewards(guidance_chosen_logps, ref_chosen_logps, beta)
    rejected_token_rewards = implicit_token_rewards(guidance_rejected_logps, ref_rejected_logps, beta)
    return tgdpo_loss_from_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_token_rewards, rejected_token_rewards, chosen_mask, rejected_mask, beta, alpha, clamp_weights,
    )


def tgdpo_loss_from_rewards(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_token_rewards,
    rejected_token_rewards,
    chosen_mask,
    rejected_mask,
    beta=0.1,
    alpha=0.5,
    clamp_weights=False,
):
    """TGDPO with the token rewards r_hat given directly (a token reward model, or rewards from the data)."""
    chosen_mask = chosen_mask.bool()
    rejected_mask = rejected_mask.bool()

    # Only the policy carries gradient; ref and the rewards are constants.
    chosen_logratio = _masked(policy_chosen_logps - ref_chosen_logps.detach(), chosen_mask)
    rejected_logratio = _masked(policy_rejected_logps - ref_rejected_logps.detach(), rejected_mask)

    with torch.no_grad():
        chosen_token_reward = chosen_token_rewards.detach()
        rejected_token_reward = rejected_token_rewards.detach()
        # Masking the weights too keeps garbage at masked positions out of z and its gradient.
        chosen_weights = _masked(beta * (1.0 + alpha * chosen_token_reward), chosen_mask)
        rejected_weights = _masked(beta * (1.0 - alpha * rejected_token_reward), rejected_mask)

        # Counted before clamping, so the stat shows how often clamping matters.
        negative_weights = (chosen_weights < 0).sum() + (rejected_weights < 0).sum()
        if clamp_weights:
            chosen_weights = chosen_weights.clamp(min=0.0)
            rejected_weights = rejected_weights.clamp(min=0.0)

    z = (chosen_weights * chosen_logratio).sum(-1) - (rejected_weights * rejected_logratio).sum(-1)
    losses = -F.logsigmoid(z)

    # Rewards are the usual DPO implicit rewards so runs are comparable across losses.
    chosen_rewards = (beta * chosen_logratio.sum(-1)).detach()
    rejected_rewards = (beta * rejected_logratio.sum(-1)).detach()

    # Token-level sums let a trainer recombine the means exactly across micro-batches.
    chosen_tokens = chosen_mask.sum().float()
    rejected_tokens = rejected_mask.sum().float()
    chosen_weight_sum = chosen_weights.sum().float()
    rejected_weight_sum = rejected_weights.sum().float()
    weighted_tokens = chosen_tokens + rejected_tokens
    negative_weights = negative_weights.float()
    def histogram(weights, mask):
        relative = (weights[mask] / beta).float().clamp(*WEIGHT_RANGE)
        return torch.histc(relative, bins=WEIGHT_BINS, min=WEIGHT_RANGE[0], max=WEIGHT_RANGE[1])

    stats = {
        # Distribution of the weights used, in units of beta: a list of counts per bin.
        "chosen_weight_histogram": histogram(chosen_weights, chosen_mask),
        "rejected_weight_histogram": histogram(rejected_weights, rejected_mask),
        # Means are of the weights actually used (after clamping, if on).
        "chosen_weight_mean": chosen_weight_sum / chosen_tokens.clamp(min=1),
        "rejected_weight_mean": rejected_weight_sum / rejected_tokens.clamp(min=1),
        "negative_weight_fraction": negative_weights / weighted_tokens.clamp(min=1),
        "chosen_weight_sum": chosen_weight_sum,
        "chosen_tokens": chosen_tokens,
        "rejected_weight_sum": rejected_weight_sum,
        "rejected_tokens": rejected_tokens,
        "negative_weights": negative_weights,
        "weighted_tokens": weighted_tokens,
    }
    return LossOutput(losses, chosen_rewards, rejected_rewards, stats)


LOSSES = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "tgdpo": tgdpo_loss,
}


def compute_loss(loss_type, batch, beta, alpha, simpo_gamma, clamp_weights):
    """Dispatch to one loss by name; `batch` holds the log-prob and mask tensors."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss type {loss_type!r}; valid loss types: {sorted(LOSSES)}")

    def get(key):
        # A clearer message than a bare KeyError when a needed input was not computed.
        if key not in batch:
            raise KeyError(f"loss type {loss_type!r} needs batch[{key!r}]")
        return batch[key]

    if loss_type == "simpo":
        return simpo_loss(
            get("policy_chosen_logps"),
            get("policy_rejected_logps"),
            get("chosen_mask"),
            get("rejected_mask"),
            beta=beta,
            gamma=simpo_gamma,
        )
    if loss_type == "tgdpo":
        chosen_rewards, rejected_rewards = batch.get("chosen_token_rewards"), batch.get("rejected_token_rewards")
        if chosen_rewards is None:
            chosen_rewards = implicit_token_rewards(get("guidance_chosen_logps"), get("ref_chosen_logps"), beta)
            rejected_rewards = implicit_token_rewards(get("guidance_rejected_logps"), get("ref_rejected_logps"), beta)
        return tgdpo_loss_from_rewards(
            get("policy_chosen_logps"),
            get("policy_rejected_logps"),
            get("ref_chosen_logps"),
            get("ref_rejected_logps"),
            chosen_rewards,
            rejected_rewards,
            get("chosen_mask"),
            get("rejected_mask"),
            beta=beta,
            alpha=alpha,
            clamp_weights=clamp_weights,
        )
    # dpo and ipo share the same arguments.
    return LOSSES[loss_type](
        get("policy_chosen_logps"),
        get("policy_rejected_logps"),
        get("ref_chosen_logps"),
        get("ref_rejected_logps"),
        get("chosen_mask"),
        get("rejected_mask"),
        beta=beta,
    )


# ---------------------------------------------------------------------------
# Metrics: per-batch means, and sums that can be accumulated then finalised.
# ---------------------------------------------------------------------------

# tgdpo stats that are plain sums and can be added across micro-batches and workers.
TOKEN_SUM_KEYS = (
    "chosen_weight_sum",
    "chosen_tokens",
    "rejected_weight_sum",
    "rejected_tokens",
    "negative_weights",
    "weighted_tokens",
)


def loss_metrics(out):
    """Means over the pairs of one batch, plus every scalar stat."""
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


def metric_sums(out, dpo_rewards=False):
    """Sums over pairs (and tokens, for tgdpo) that add up across micro-batches. With dpo_rewards (the rewards
    are DPO's implicit ones, beta * summed log-ratio), also plain DPO's loss, whatever loss trained."""
    chosen = out.chosen_rewards.float()
    rejected = out.rejected_rewards.float()
    sums = {
        "loss_sum": out.losses.detach().float().sum().item(),
        "chosen_reward_sum": chosen.sum().item(),
        "rejected_reward_sum": rejected.sum().item(),
        "margin_sum": (chosen - rejected).sum().item(),
        "correct_sum": (chosen > rejected).float().sum().item(),
        "pairs": float(out.losses.shape[0]),
    }
    if dpo_rewards:
        sums["dpo_loss_sum"] = -F.logsigmoid(chosen - rejected).sum().item()
    for key in TOKEN_SUM_KEYS:
        if key in out.stats:
            sums[key] = out.stats[key].item()
    return sums


def finalize_metrics(sums):
    """Turn accumulated metric_sums into means."""
    pairs = sums["pairs"]
    if pairs <= 0:
        raise ValueError("finalize_metrics needs at least one pair")
    metrics = {
        "loss": sums["loss_sum"] / pairs,
        "chosen_reward": sums["chosen_reward_sum"] / pairs,
        "rejected_reward": sums["rejected_reward_sum"] / pairs,
        "reward_margin": sums["margin_sum"] / pairs,
        "reward_accuracy": sums["correct_sum"] / pairs,
    }
    if "dpo_loss_sum" in sums:
        metrics["dpo_loss"] = sums["dpo_loss_sum"] / pairs
    if "weighted_tokens" in sums:
        metrics["chosen_weight_mean"] = sums["chosen_weight_sum"] / max(sums["chosen_tokens"], 1.0)
        metrics["rejected_weight_mean"] = sums["rejected_weight_sum"] / max(sums["rejected_tokens"], 1.0)
        metrics["negative_weight_fraction"] = sums["negative_weights"] / max(sums["weighted_tokens"], 1.0)
    return metrics
