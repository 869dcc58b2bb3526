"""The matplotlib figures the book shows. Each function returns the matplotlib Figure.

Chapters: budget, model, pretraining, finetuning.
"""
from __future__ import annotations

# ---- budget + pretraining chapters --------------------------------------------------

# ---- model chapter ------------------------------------------------------------------

# ---- finetuning chapter -------------------------------------------------------------
