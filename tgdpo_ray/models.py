"""Loading causal LMs and tokenizers (hub names or local paths), and the tiny model the demo and tests use."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from tgdpo_ray.errors import UserError

if TYPE_CHECKING:
    from tgdpo_ray.config import JobConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


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
        tokenizer.chat_template = chat_template
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
    from tgdpo_ray.config import SCORED_GUIDANCE

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


def tokenizer_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Text for training the tiny tokenizer: the demo vocabulary plus generic English-like words."""
    from tgdpo_ray.demo_data import DEMO_WORDS, make_pair

    rng = random.Random(seed)
    corpus = []
    for _ in range(lines // 2):
        pair = make_pair(rng)
        corpus += [pair["prompt"], pair["chosen"]]
    corpus += [" ".join(rng.choices(DEMO_WORDS, k=12)) for _ in range(lines // 4)]
    return corpus


def make_tiny_model(out_dir: str, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128, layers: int = 2,
                    token_reward_head: bool = False):
    """A random-initialised Llama (head_dim 64, which vLLM's CPU attention needs) with a locally trained BPE
    tokenizer and a ChatML template, saved in Hugging Face format. token_reward_head: a per-token scalar head
    (LlamaForTokenClassification, one label) instead of the LM head, for guidance.source: token_reward_model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Byte-level BPE: every string is encodable, so real prompts never hit an unknown token.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    if token_reward_head:
        LlamaForTokenClassification(config).save_pretrained(out)
        return out
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return out
