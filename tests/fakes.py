"""Small stand-ins shared by the model, sampling and checkpoint tests."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass

import torch

TOKEN_DIM = 16


@dataclass
class Emb:
    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class HashEncoder:
    """Deterministic stand-in caption encoder: one seeded random vector per word, padded to L."""

    name = "hash"
    pooled_dim = TOKEN_DIM
    token_dim = TOKEN_DIM
    max_tokens = 6

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, captions):
        self.calls += 1
        n, L = len(captions), self.max_tokens
        tokens, mask = torch.zeros(n, L, TOKEN_DIM), torch.zeros(n, L, dtype=torch.bool)
        for i, caption in enumerate(captions):
            for j, word in enumerate((["<s>"] + caption.split())[:L]):
                seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
                tokens[i, j] = torch.randn(TOKEN_DIM, generator=torch.Generator().manual_seed(seed))
                mask[i, j] = True
        return Emb(torch.nn.functional.normalize(tokens.sum(1), dim=-1), tokens, mask)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
