"""Tiny random decoder models for tests: odd sizes so that shape bugs show."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama_mha", "llama_gqa", "qwen2", "qwen3")


def tiny_config(family: str, num_layers: int = 3):
    """hidden 48, 6 query heads of 8 dims, MLP 40 channels, vocab 101."""
    common = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=num_layers,
        num_attention_heads=6,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    if family == "llama_mha":
        return LlamaConfig(num_key_value_heads=6, **common)
    if family == "llama_gqa":
        return LlamaConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=3, **common)
    if family == "qwen3":
        return Qwen3Config(num_key_value_heads=2, **common)
    raise ValueError(family)


def tiny_model(family: str = "llama_gqa", num_layers: int = 3, seed: int = 0):
    """A randomly initialised model in fp32 eval mode; weights scaled up so pruning visibly matters."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" not in name:
                p.normal_(0, 0.15)
    return model.eval()


def random_tokens(num_sequences: int = 4, seq_len: int = 16, vocab: int = 101, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num_sequences, seq_len), generator=g)


def char_tokenizer(vocab_size: int = 101):
    """A deterministic character-level fast tokenizer (no downloads): printable ASCII + <eos>/<unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 2]
    vocab = {"<unk>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes heads and channels from a model. "
    "A supernet holds every module at a ladder of sparsities; the search picks one level per module. "
)


def save_tiny_checkpoint(directory, family: str = "llama_gqa", num_layers: int = 3, seed: int = 0):
    """A tiny random model + char tokenizer saved as a Hugging Face folder; returns the folder."""
    from pathlib import Path

    directory = Path(directory)
    tiny_model(family, num_layers, seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def write_corpus(path, num_docs: int = 40, seed: int = 0):
    """A small text file (one document per line) for calibration/evaluation in tests."""
    import random
    from pathlib import Path

    rng = random.Random(seed)
    words = SAMPLE_TEXT.split()
    lines = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(num_docs)]
    Path(path).write_text("\n".join(lines) + "\n")
    return path
