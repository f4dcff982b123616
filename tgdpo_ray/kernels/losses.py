"""The DPO family of preference losses (DPO, IPO, SimPO, TGDPO), supervised fine-tuning (SFT), and their metrics.

A loss is built once from the config's loss section (build_loss) and called on the PairBatch of each micro-batch:
per-token log-probs [n, W] already gathered at the answer tokens, plus 0/1 (or bool) answer masks [n, W]. Masked
positions are removed with torch.where (not multiplication) so that whatever they hold cannot leak into the loss,
the rewards or the gradients.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

# Token weights are histogrammed in units of beta (1 + alpha r_hat): 40 bins over [-1, 3], outliers in the edges.
WEIGHT_BINS, WEIGHT_RANGE = 40, (-1.0, 3.0)


@dataclass
class PairBatch:
    """The loss inputs of n pairs, each [n, W]: one row per pair, the chosen or the rejected answer's tokens."""

    policy_chosen_logps: torch.Tensor  # the only inputs that carry gradient
    policy_rejected_logps: torch.Tensor
    chosen_mask: torch.Tensor  # True (or 1) on the answer tokens
    rejected_mask: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None  # every loss but simpo
    ref_rejected_logps: Optional[torch.Tensor] = None
    # tgdpo: the guidance model's log-probs (implicit guidance), or the token rewards r_hat themselves.
    guidance_chosen_logps: Optional[torch.Tensor] = None
    guidance_rejected_logps: Optional[torch.Tensor] = None
    chosen_token_rewards: Optional[torch.Tensor] = None
    rejected_token_rewards: Optional[torch.Tensor] = None


class LossOutput(NamedTuple):
    losses: torch.Tensor  # [batch] per-pair losses
    chosen_rewards: torch.Tensor  # [batch], detached
    rejected_rewards: torch.Tensor  # [batch], detached
    stats: dict  # str -> scalar tensor or [batch] tensor


def _masked(values, mask):
    return torch.where(mask.bool(), values, torch.zeros_like(values))


def _token_count(mask):
    # clamp avoids 0/0 for an (invalid) empty response; the sum is 0 there anyway.
    return mask.bool().sum(-1).clamp(min=1)


def _masked_mean(values, mask):
    return _masked(values, mask).sum(-1) / _token_count(mask)


def shuffled_within_answers(values, mask, seed: int = 0):
    """Each row's values at its masked positions in a random order (the rest unchanged): the same numbers, their
    places lost. The order comes from a generator seeded afresh on every call, so a batch is always shuffled the
    same way and a resumed run repeats it."""
    mask = mask.bool()
    keys = torch.rand(values.shape, generator=torch.Generator().manual_seed(seed)).to(values.device)
    # Masked positions first: in their own order (where to write) and in a random one (what to write there).
    places = (~mask).to(torch.int8).argsort(dim=-1, stable=True)
    order = keys.masked_fill(~mask, 2.0).argsort(dim=-1, stable=True)
    return values.scatter(-1, places, values.gather(-1, order))


def _sums_to(weights, totals):
    """Each row of (nonnegative) weights scaled to sum to its total; a row of zeros stays zero."""
    sums = weights.sum(-1, keepdim=True)
    return torch.where(sums > 0, weights * totals[:, None] / sums.clamp(min=1e-12), weights)


def _answer_max(values, mask):
    """The largest value on the answer tokens (-inf when there are none)."""
    return torch.where(mask.bool(), values, torch.full_like(values, -torch.inf)).max()


def token_logratios(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta - log pi_ref of every chosen and every rejected answer token, 0 off the answers. Only the policy
    carries gradient: the reference is a constant."""
    return (_masked(batch.policy_chosen_logps - batch.ref_chosen_logps.detach(), batch.chosen_mask),
            _masked(batch.policy_rejected_logps - batch.ref_rejected_logps.detach(), batch.rejected_mask))


def summed_logratios(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the log-ratio summed over the chosen and over the rejected answer: beta times these are DPO's
    implicit rewards, which every loss with a reference reports so that runs compare across losses."""
    chosen, rejected = token_logratios(batch)
    return chosen.sum(-1), rejected.sum(-1)


@dataclass(frozen=True)
class DPOLoss:
    beta: float = 0.1

    def __call__(self, batch: PairBatch) -> LossOutput:
        chosen, rejected = summed_logratios(batch)
        losses = -F.logsigmoid(self.beta * (chosen - rejected))
        return LossOutput(losses, (self.beta * chosen).detach(), (self.beta * rejected).detach(), {})


@dataclass(frozen=True)
class IPOLoss:
    beta: float = 0.1

    def __call__(self, batch: PairBatch) -> LossOutput:
        chosen, rejected = summed_logratios(batch)
        # IPO as in TRL: the log-ratios are averaged over response tokens.
        chosen_mean = chosen / _token_count(batch.chosen_mask)
        rejected_mean = rejected / _token_count(batch.rejected_mask)
        losses = (chosen_mean - rejected_mean - 1.0 / (2.0 * self.beta)) ** 2
        # Rewards stay the DPO-style summed implicit rewards, same as every other loss.
        return LossOutput(losses, (self.beta * chosen).detach(), (self.beta * rejected).detach(), {})


@dataclass(frozen=True)
class SimPOLoss:
    beta: float = 2.0
    gamma: float = 0.5  # the target margin

    def __call__(self, batch: PairBatch) -> LossOutput:
        # Reference-free: the reward is the length-normalised policy log-prob.
        chosen_rewards = self.beta * _masked_mean(batch.policy_chosen_logps, batch.chosen_mask)
        rejected_rewards = self.beta * _masked_mean(batch.policy_rejected_logps, batch.rejected_mask)
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - self.gamma)
        return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), {})


@dataclass(frozen=True)
class SFTLoss:
    """Supervised fine-tuning on the chosen answers, the first stage of the usual recipe: each pair's loss is the
    negative log-likelihood of its chosen answer, averaged over the answer's tokens (so every pair weighs the same,
    as in every loss here). The rejected answer takes no part in the loss; the rewards are each answer's mean token
    log-prob, so reward accuracy says how often the policy finds the chosen answer likelier per token."""

    def __call__(self, batch: PairBatch) -> LossOutput:
        chosen = _masked_mean(batch.policy_chosen_logps, batch.chosen_mask)
        rejected = _masked_mean(batch.policy_rejected_logps, batch.rejected_mask)
        return LossOutput(-chosen, chosen.detach(), rejected.detach(), {})


@dataclass(frozen=True)
class TGDPOLoss:
    """TGDPO's loss -log sigmoid(z), z = sum_t w_w,t l_w,t - sum_t w_l,t l_l,t, with l the policy's token log-ratio
    against the reference and the token weights w_w = beta (1 + alpha r_w), w_l = beta (1 - alpha r_l).

    z splits into DPO's contrast z_dpo = beta (sum l_w - sum l_l) and the guidance's part
    z_guidance = alpha beta (sum r_w l_w + sum r_l l_l), which contrasts nothing: it pays for moving each token's
    log-ratio along the guidance's own, in both answers. Both are in the stats, with the weight-sum gap
    (sum w_w - sum w_l) / beta: when every log-ratio moves by d, z moves by d beta times that gap.
    center_guidance subtracts each answer's mean r over its tokens first, so that sum_t w = beta |y| as in DPO and
    a uniform shift of the log-ratios moves z as it moves DPO's. shuffle_guidance permutes each answer's r over its
    tokens (a control: the same rewards, their places lost). normalize_weights scales each answer's weights (after
    clamping) to sum to beta |y|: with clamp_weights too, every chosen token is pushed up and every rejected one
    down, as in DPO, and only how hard is the guidance's (README "A guarded form")."""

    beta: float = 0.1
    alpha: float = 0.5  # guidance strength; 0 gives DPO exactly
    clamp_weights: bool = False  # clamp the token weights at 0 (the authors do not)
    center_guidance: bool = False  # each answer's token rewards less their mean (the authors do not)
    shuffle_guidance: bool = False  # each answer's token rewards in a random order over its tokens (a control)
    normalize_weights: bool = False  # each answer's weights scaled to sum to beta |y| (the authors do not)

    def token_rewards(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The token rewards r_hat, constants: given (a token reward model, or the data), or the paper's implicit
        form beta * (log pi_g - log pi_ref) from the guidance model's log-probs."""
        if batch.chosen_token_rewards is not None:
            return batch.chosen_token_rewards.detach(), batch.rejected_token_rewards.detach()
        with torch.no_grad():
            return (self.beta * (batch.guidance_chosen_logps - batch.ref_chosen_logps),
                    self.beta * (batch.guidance_rejected_logps - batch.ref_rejected_logps))

    def __call__(self, batch: PairBatch) -> LossOutput:
        beta, alpha = self.beta, self.alpha
        chosen_mask = batch.chosen_mask.bool()
        rejected_mask = batch.rejected_mask.bool()
        chosen_logratio, rejected_logratio = token_logratios(batch)

        with torch.no_grad():
            chosen_token_reward, rejected_token_reward = self.token_rewards(batch)
            if self.shuffle_guidance:
                chosen_token_reward = shuffled_within_answers(chosen_token_reward, chosen_mask, seed=0)
                rejected_token_reward = shuffled_within_answers(rejected_token_reward, rejected_mask, seed=1)
            if self.center_guidance:
                chosen_token_reward = chosen_token_reward - _masked_mean(chosen_token_reward, chosen_mask)[:, None]
                rejected_token_reward = (rejected_token_reward
                                         - _masked_mean(rejected_token_reward, rejected_mask)[:, None])
            # Masking the weights too keeps garbage at masked positions out of z and its gradient.
            chosen_weights = _masked(beta * (1.0 + alpha * chosen_token_reward), chosen_mask)
            rejected_weights = _masked(beta * (1.0 - alpha * rejected_token_reward), rejected_mask)

            # Counted before clamping, so the stat shows how often clamping matters.
            negative_weights = (chosen_weights < 0).sum() + (rejected_weights < 0).sum()
            if self.clamp_weights:
                chosen_weights = chosen_weights.clamp(min=0.0)
                rejected_weights = rejected_weights.clamp(min=0.0)
            if self.normalize_weights:
                chosen_weights = _sums_to(chosen_weights, beta * _token_count(chosen_mask))
                rejected_weights = _sums_to(rejected_weights, beta * _token_count(rejected_mask))

        z = (chosen_weights * chosen_logratio).sum(-1) - (rejected_weights * rejected_logratio).sum(-1)
        losses = -F.logsigmoid(z)

        # Rewards are the usual DPO implicit rewards so runs are comparable across losses.
        chosen_rewards = (beta * chosen_logratio.sum(-1)).detach()
        rejected_rewards = (beta * rejected_logratio.sum(-1)).detach()

        with torch.no_grad():
            # What carries z (see the class docstring), per pair: DPO's contrast is the reward margin, and
            # z_guidance the rest of z, clamping included.
            z_dpo = chosen_rewards - rejected_rewards
            z_guidance = z.detach() - z_dpo
            chosen_pair_weights, rejected_pair_weights = chosen_weights.sum(-1), rejected_weights.sum(-1)
            weight_sum_gap = (chosen_pair_weights - rejected_pair_weights) / beta
            weight_max = torch.maximum(_answer_max(chosen_weights, chosen_mask),
                                       _answer_max(rejected_weights, rejected_mask)) / beta

        # Token-level sums let a trainer recombine the means exactly across micro-batches.
        chosen_tokens = chosen_mask.sum().float()
        rejected_tokens = rejected_mask.sum().float()
        chosen_weight_sum = chosen_pair_weights.sum().float()
        rejected_weight_sum = rejected_pair_weights.sum().float()
        weighted_tokens = chosen_tokens + rejected_tokens
        negative_weights = negative_weights.float()

        def histogram(weights, mask):
            # histc's equal-width bins, counting the answer tokens only, NaN weights nowhere (as histc). A mask
            # weight rather than weights[mask]: boolean indexing would make the host wait for the GPU in the middle
            # of every micro-batch.
            low, high = WEIGHT_RANGE
            relative = (weights / beta).float().clamp(low, high)
            counted = mask & ~relative.isnan()
            bins = ((relative.nan_to_num(low) - low) / (high - low) * WEIGHT_BINS).long().clamp(0, WEIGHT_BINS - 1)
            return torch.zeros(WEIGHT_BINS, device=weights.device).scatter_add_(0, bins.flatten(),
                                                                                 counted.flatten().float())

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
            # Sums over the pairs, made means over a step's pairs by finalize_metrics; the max is of the step.
            "z_dpo_sum": z_dpo.sum().float(),
            "z_guidance_sum": z_guidance.sum().float(),
            "weight_sum_gap_sum": weight_sum_gap.sum().float(),
            "weight_max": weight_max.float(),
        }
        return LossOutput(losses, chosen_rewards, rejected_rewards, stats)


Loss = Callable[[PairBatch], LossOutput]

# Every loss type, built from the config's loss section (config.LossSection).
LOSSES = {
    "dpo": lambda section: DPOLoss(section.beta),
    "ipo": lambda section: IPOLoss(section.beta),
    "simpo": lambda section: SimPOLoss(section.beta, section.simpo_gamma),
    "sft": lambda section: SFTLoss(),
    "tgdpo": lambda section: TGDPOLoss(section.beta, section.alpha, section.clamp_weights, section.center_guidance,
                                       section.shuffle_guidance, section.normalize_weights),
}


def build_loss(section) -> Loss:
    """The loss of the config's loss section, built once; call it on each micro-batch's PairBatch."""
    if section.type not in LOSSES:
        raise ValueError(f"unknown loss type {section.type!r}; valid loss types: {sorted(LOSSES)}")
    return LOSSES[section.type](section)


# ---------------------------------------------------------------------------
# Metrics: sums that can be accumulated across micro-batches and workers, then finalised into means.
# ---------------------------------------------------------------------------

# tgdpo stats that are plain sums and can be added across micro-batches and workers.
TOKEN_SUM_KEYS = (
    "chosen_weight_sum",
    "chosen_tokens",
    "rejected_weight_sum",
    "rejected_tokens",
    "negative_weights",
    "weighted_tokens",
    "z_dpo_sum",
    "z_guidance_sum",
    "weight_sum_gap_sum",
)
# tgdpo stats combined across micro-batches and workers by their maximum.
MAX_KEYS = ("weight_max",)


def metric_sums(out, dpo_rewards=False):
    """Sums over pairs (and tokens, for tgdpo) that add up across micro-batches, as float64 scalars on the loss's
    device (the trainer reads them once a step: reading each micro-batch's would stall the GPU's queue), and the
    pair count as a plain float; the stats of MAX_KEYS are maxima, combined by their maximum. With dpo_rewards (the
    rewards are DPO's implicit ones, beta * summed log-ratio), also plain DPO's loss, whatever loss trained."""
    chosen = out.chosen_rewards.detach().double()
    rejected = out.rejected_rewards.detach().double()
    sums = {
        "loss_sum": out.losses.detach().double().sum(),
        "chosen_reward_sum": chosen.sum(),
        "rejected_reward_sum": rejected.sum(),
        "margin_sum": (chosen - rejected).sum(),
        "correct_sum": (chosen > rejected).double().sum(),
        "pairs": float(out.losses.shape[0]),
    }
    if dpo_rewards:
        sums["dpo_loss_sum"] = -F.logsigmoid(chosen - rejected).sum()
    for key in TOKEN_SUM_KEYS + MAX_KEYS:
        if key in out.stats:
            sums[key] = out.stats[key].detach().double()
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
        for name in ("z_dpo", "z_guidance", "weight_sum_gap"):
            metrics[name] = sums[f"{name}_sum"] / pairs
        metrics["weight_max"] = sums["weight_max"]
    return metrics
