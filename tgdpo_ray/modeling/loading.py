"""Loading causal LMs, token reward models and tokenizers (hub names or local paths), and checking that the
policy, reference and guidance models agree on the tokens."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from tgdpo_ray.common.errors import UserError

if TYPE_CHECKING:
    from tgdpo_ray.config.job import JobConfig

class ModelLoadError(UserError, RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names it."""


def resolve_dtype(precision: str) -> torch.dtype:
    """`auto` means bf16 where the GPU supports it and fp32 otherwise (CPU training in bf16 is slow and lossy)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {name_or_path!r}: {err}") from None
    if chat_template:
        # data.chat_template is a template, or the path of a file holding one.
        tokenizer.chat_template = Path(chat_template).read_text() if os.path.isfile(chat_template) else chat_template
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, precision: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(precision), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model {name_or_path!r}: {err}") from None


def disable_dropout(model) -> None:
    """Dropout off everywhere: nn.Dropout modules, and the float rates attention implementations read."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_token_reward_model(name_or_path: str, precision: str = "auto", trust_remote_code: bool = False):
    """A model with a per-token scalar head: AutoModelForTokenClassification with one label."""
    from transformers import AutoModelForTokenClassification

    try:
        model = AutoModelForTokenClassification.from_pretrained(
            name_or_path, dtype=resolve_dtype(precision), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the token reward model {name_or_path!r}: {err}") from None
    if model.config.num_labels != 1:
        raise ModelLoadError(f"{name_or_path!r} has {model.config.num_labels} labels per token; a token reward "
                             "model has one (a scalar reward per token)")
    return model


class ModelMismatchError(UserError, ValueError):
    """A reference or guidance model that reads the policy's token ids differently; the message names both."""


def vocabulary_signature(name_or_path: str, trust_remote_code: bool = False) -> dict:
    """What a scorer model must share with the policy: the same embedding size, the same token for every id
    and the same special tokens."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the config of {name_or_path!r}: {err}") from None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "config.vocab_size": getattr(config.get_text_config(), "vocab_size", None),
        "tokenizer vocabulary hash": hashlib.sha256(vocab.encode()).hexdigest()[:12],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def check_models_agree(config: JobConfig) -> None:
    """Fails, before any Ray resource starts, when a reference or guidance model does not share the policy's
    tokenizer and vocabulary. The scorers compute log-probs of the policy tokenizer's ids: in another model a
    larger vocabulary gives wrong values silently and a smaller one an IndexError inside a scorer."""
    from tgdpo_ray.config.job import SCORED_GUIDANCE

    policy = config.policy
    scorers = []
    if config.needs_reference:
        scorers.append(("reference.model", config.reference_model, config.reference.trust_remote_code))
    if config.guidance_kind in SCORED_GUIDANCE:  # a token reward model too: it reads the same ids
        scorers.append(("guidance.model", config.guidance.model, config.guidance.trust_remote_code))
    scorers = [scorer for scorer in scorers if scorer[1] != policy.model]  # the policy agrees with itself
    if not scorers:
        return
    expected = vocabulary_signature(policy.model, policy.trust_remote_code)
    for key, model, trust_remote_code in scorers:
        found = vocabulary_signature(model, trust_remote_code)
        differences = [f"{what} {found[what]} vs {expected[what]}" for what in expected
                       if found[what] != expected[what]]
        if differences:
            raise ModelMismatchError(
                f"{key} {model} does not agree with policy.model {policy.model}: "
                f"{'; '.join(differences)} ({key.split('.')[0]} vs policy). The scorers compute log-probs of the "
                "policy tokenizer's token ids, so the reference and guidance models need the policy's tokenizer, "
                "vocabulary size and special tokens"
            )
