"""Calibration defaults shared by every command and library entry point that calibrates (one place)."""

from __future__ import annotations

# GPTQ's customary 128 samples; windows of 512 tokens are what qkiln's measurements use (README, bench/).
CALIBRATION_SAMPLES = 128
CALIBRATION_SEQ_LEN = 512
