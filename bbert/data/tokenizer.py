"""WordPiece tokenizer: train one on the corpus with `tokenizers`, or load an existing one.

Saved tokenizers load with ``transformers.AutoTokenizer.from_pretrained(dir)`` and add
[CLS]/[SEP]. Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from bbert.data.layout import tokenizer_dir

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# What save_pretrained writes; either file makes a folder a tokenizer folder.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class TokenizerError(ValueError):
    """Raised when a tokenizer can't be used (too small a vocabulary, missing special tokens).
    """


def train_tokenizer(texts: Iterable[str], vocab_size: int = 30522, lowercase: bool = True,
                    min_frequency: int = 2, max_seq_length: int = 128):
    """Train a BERT WordPiece tokenizer on ``texts`` and wrap it for ``transformers``.

    Returns a ``transformers.BertTokenizer`` (the fast, tokenizers-backed class in transformers 5).
   
    """
    from tokenizers import BertWordPieceTokenizer, models

    # strip_accents=None: BERT's convention (strip when lowercasing), which transformers re-creates on load.
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=None)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    backend = wordpiece._tokenizer
    # The trainer breaks frequency ties in hash order, which changes from process to process:
    # sorting gives the same ids to the same token set. (The set itself can still differ in a
    # token or two at the cutoff, which is why prepare reuses the tokenizer it saved.)
    vocab = backend.get_vocab()
    ordered = SPECIAL_TOKENS + sorted(t for t in vocab if t not in SPECIAL_TOKENS)
    backend.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##")
    return wrap_tokenizer(backend, lowercase=lowercase, model_max_length=max_seq_length)


def wrap_tokenizer(backend, lowercase: bool = True, model_max_length: int = 512):
    """Wrap a ``tokenizers.Tokenizer`` as ``transformers.BertTokenizer``.

    Not ``PreTrainedTokenizerFast``: in transformers 5 that class replaces the post-processor
    with one that adds no [CLS]/[SEP]. And never ``BertTokenizerFast(vocab_file=...)``, which
    silently builds a 5-token vocabulary.
    """
    from transformers import BertTokenizer

    tok = BertTokenizer(tokenizer_object=backend, do_lower_case=lowercase, unk_token="[UNK]",
                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                        mask_token="[MASK]", model_max_length=model_max_length)
    check_tokenizer(tok, expected_vocab_size=backend.get_vocab_size())
    return tok


def load_tokenizer(path: str | Path):
    """Load a tokenizer folder, the tokenizer of a model folder, checkpoint or run dir (the model's
    own, for continued pretraining), or, online, a hub name such as ``bert-large-uncased``.

    Checks that the vocabulary is real and the special tokens exist.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    from bbert.hub import require_hub

    local = Path(path)
    if local.is_dir() and (tokenizer_dir(local) / "tokenizer.json").exists():
        local = tokenizer_dir(local)  # a data dir or model folder holding a tokenizer/
    elif local.is_dir() and not _holds_tokenizer(local):
        local = model_tokenizer_folder(local) or local  # a run dir or checkpoint: its model's
    if not local.exists():
        if _looks_local(str(path)):
            raise TokenizerError(f"tokenizer folder {path} does not exist; check the path (a data dir's "
                                 "tokenizer is DATA_DIR/tokenizer), or leave out --tokenizer to train one")
        require_hub(f"the tokenizer {str(path)!r} (no local folder of that name)",
                    "train one on your corpus (bbert prepare --vocab-size N, the default) or pass "
                    "a local tokenizer folder, e.g. DATA_DIR/tokenizer from an earlier prepare")
        tok = AutoTokenizer.from_pretrained(str(path))
    elif not _holds_tokenizer(local):
        raise TokenizerError(f"{path} is not a tokenizer folder: it should hold tokenizer.json (or "
                             "vocab.txt) and tokenizer_config.json, as save_pretrained writes them; "
                             "a data dir's tokenizer is DATA_DIR/tokenizer, and a model folder or "
                             "run dir works when its model was saved with its tokenizer")
    else:
        try:
            # a bbert model folder's config.json is not transformers': keep AutoTokenizer off it
            # (it would only warn; tokenizer_config.json names the class)
            config = {"config": PretrainedConfig()} if _model_type(local) == "bbert" else {}
            tok = AutoTokenizer.from_pretrained(str(local), **config)
        except (OSError, ValueError, KeyError, TypeError) as e:  # what damaged or foreign files raise
            problem = " ".join(str(e).split())[:120] or type(e).__name__
            raise TokenizerError(f"{path} holds tokenizer files that transformers can't load ({problem}); "
                                 "point --tokenizer at a folder written by save_pretrained, e.g. "
                                 "DATA_DIR/tokenizer, or leave out --tokenizer to train one") from None
    check_tokenizer(tok)
    return tok


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _holds_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def model_tokenizer_folder(path) -> Path | None:
    """The tokenizer saved with the model of a run dir or checkpoint: in its ``model/``, in
    ``final/model/``, or in the latest checkpoint's ``model/`` (where ``bbert.hf`` finds the model).
    """
    from bbert.run_dir import final_dir, latest_checkpoint, model_dir

    checkpoint = latest_checkpoint(path)
    for folder in (model_dir(path), model_dir(final_dir(path)), checkpoint and model_dir(checkpoint)):
        if folder and _holds_tokenizer(folder):
            return folder
    return None


def _looks_local(name: str) -> bool:
    # A hub id is NAME or OWNER/NAME; a path starts with / . ~, has more parts, or its parent exists.
    parent = Path(name).parent
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or (str(parent) != "." and parent.exists()))


def check_tokenizer(tok, expected_vocab_size: int | None = None) -> None:
    """Raise :class:`TokenizerError` unless ``tok`` has a real vocabulary, the BERT special
    tokens, and adds [CLS]/[SEP] around a sentence.
    """
    size = len(tok)
    if expected_vocab_size is not None and size != expected_vocab_size:
        raise TokenizerError(f"tokenizer has {size} tokens but {expected_vocab_size} were trained")
    if size <= len(SPECIAL_TOKENS) + 10:
        raise TokenizerError(f"tokenizer vocabulary has only {size} tokens; was it built with "
                             "BertTokenizerFast(vocab_file=...)? Load with tokenizer_file= or "
                             "AutoTokenizer.from_pretrained(dir)")
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):
        if getattr(tok, name) is None:
            raise TokenizerError(f"tokenizer has no {name.removesuffix('_id')}; bbert needs "
                                 "[PAD], [UNK], [CLS], [SEP] and [MASK]")
    ids = tok("a b")["input_ids"]
    if ids[0] != tok.cls_token_id or ids[-1] != tok.sep_token_id:
        raise TokenizerError("tokenizer does not add [CLS] ... [SEP]; wrap it with "
                             "bbert.data.tokenizer.wrap_tokenizer")


def special_ids(tok) -> dict[str, int]:
    """The ids of [PAD], [CLS], [SEP], [MASK] and [UNK]."""
    return {"pad": tok.pad_token_id, "cls": tok.cls_token_id, "sep": tok.sep_token_id,
            "mask": tok.mask_token_id, "unk": tok.unk_token_id}


def encoder(tok):
    """The raw ``tokenizers.Tokenizer`` behind ``tok``, without truncation or padding, for
    fast ``encode_batch`` over many documents.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: tok stays as it was
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenizer_fingerprint(tok) -> str:
    """SHA-256 of what decides the token ids (normalizer, pre-tokenizer, model, vocabulary),
    ignoring truncation and padding settings.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
