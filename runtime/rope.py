"""Rotary position embeddings as transformers' Llama applies them (rotate_half, not interleaved).

The frequencies and angles are computed in float32 the way transformers computes them
(`inv_freq` from a float32 power, `angle = float32(pos) * inv_freq` rounded to float32), so our
logits match `LlamaForCausalLM` even at positions in the thousands, where a float64 angle would
differ from transformers' by ~pos * 6e-8 radians.
"""

from __future__ import annotations

import math

import numpy as np

from qkiln.model.config import LlamaConfig, RopeScaling


def inv_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> np.ndarray:  # (head_dim // 2,) float32
    """Inverse frequencies `theta ** (-2i / head_dim)`, rescaled by band for `llama3` rope_scaling.

    llama3 scaling (Llama 3.1+): wavelengths shorter than `orig / high_freq_factor` are kept, longer than
    `orig / low_freq_factor` are divided by `factor`, and those in between interpolate smoothly.
    """
    assert head_dim % 2 == 0, f"RoPE needs an even head_dim, got {head_dim}"
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # (half,)
    inv = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)  # (half,)
    if scaling is None:
        return inv
    factor = np.float32(scaling.factor)
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    orig = scaling.original_max_position_embeddings
    low_freq_wavelen = orig / low
    high_freq_wavelen = orig / high
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)  # (half,)
    scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((np.float32(orig) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RopeTable:
    """cos/sin per position, computed once and grown (doubling) when a longer position is asked for."""

    def __init__(self, config: LlamaConfig, initial: int = 2048):
        self.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)  # (half,)
        self.cos = np.empty((0, self.inv_freq.size), np.float32)  # (n_pos, half)
        self.sin = np.empty((0, self.inv_freq.size), np.float32)  # (n_pos, half)
        self._grow(min(initial, max(config.max_position_embeddings, 1)))

    def _grow(self, n_pos: int) -> None:
        pos = np.arange(n_pos, dtype=np.float32)  # (n_pos,)
        angles = pos[:, None] * self.inv_freq[None, :]  # (n_pos, half) float32, rounded like transformers
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def get(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin for positions start..start+length-1, each (length, half) float32 (views)."""
        end = start + length
        if end > self.cos.shape[0]:
            self._grow(max(end, 2 * self.cos.shape[0]))
        return self.cos[start:end], self.sin[start:end]
