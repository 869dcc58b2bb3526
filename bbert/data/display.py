"""HTML views of samples for the notebooks: which tokens were masked, replaced or kept.

Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import html

import numpy as np

from bbert.data.masking import IGNORE_INDEX

COLORS = {"mask": "#f4a6a6", "random": "#f7d58b", "kept": "#a8d8a8", "special": "#dddddd"}


def masking_html(tokenizer, original, masked, labels, per_row: int = 16) -> str:
    """An HTML table of one sample: each cell shows the input token, and, where the model must
    predict, the original below it. Red: [MASK], yellow: a random token, green: kept as is
    (but still predicted), gray: special tokens.
    """
    original, masked, labels = (np.asarray(x) for x in (original, masked, labels))
    shown = tokenizer.convert_ids_to_tokens(masked.tolist())
    truth = tokenizer.convert_ids_to_tokens(original.tolist())
    special = set(tokenizer.all_special_ids)
    cells = []
    for i, (tok, true) in enumerate(zip(shown, truth)):
        if labels[i] != IGNORE_INDEX:
            kind = "mask" if masked[i] == tokenizer.mask_token_id else (
                "kept" if masked[i] == original[i] else "random")
            body = f"<b>{html.escape(tok)}</b><br><small>{html.escape(true)}</small>"
        else:
            kind = "special" if int(original[i]) in special else None
            body = html.escape(tok)
        style = f"background:{COLORS[kind]};" if kind else ""
        cells.append(f'<td style="{style}padding:2px 4px;text-align:center;border:1px solid #eee">{body}</td>')
    rows = ["<tr>" + "".join(cells[i:i + per_row]) + "</tr>" for i in range(0, len(cells), per_row)]
    legend = " ".join(f'<span style="background:{c};padding:1px 6px">{name}</span>'
                      for name, c in COLORS.items())
    return (f'<div style="font-family:monospace;font-size:12px"><table style="border-collapse:collapse">'
            f'{"".join(rows)}</table><p>{legend}</p></div>')
