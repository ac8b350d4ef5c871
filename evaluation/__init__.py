"""Reward evaluation (DESIGN.md section 2.4): mean per-prompt AUROC on the world's benchmark.

``auroc`` is numpy-only; ``evaluate`` scores the benchmark with a CLIP checkpoint (torch).
"""
