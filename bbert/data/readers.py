"""Corpus readers, cleaning and the document-level train/validation split.

Every reader yields documents as plain strings; a document is the unit that the
train/validation split keeps whole. Text is decoded strictly: a file that is not valid in the
declared encoding (UTF-8 unless ``encoding`` says otherwise) is refused, never mangled.
Chapter: ``notebooks/02_data.ipynb``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import itertools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from bbert.data.layout import MANIFEST_FILE, tokenizer_dir
from bbert.hub import require_hub

FORMATS = ("auto", "text", "jsonl", "books", "wikiextractor", "hf")
TEXT_UNITS = ("paragraph", "line", "file")
TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".txt.gz", ".jsonl.gz")
_WIKI_FILE = re.compile(r"^wiki_\d+(\.gz)?$")
_DOC_TAG = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.S)
# Columns that name the document a row belongs to (found by themselves, in this order). "id" is
# last: Wikipedia's one-article-per-row datasets have it, so they stay one document per row even
# when rows_per_document joins the rows of a sentence-per-row corpus read in the same run.
DOCUMENT_ID_FIELDS = ("document_id", "doc_id", "book_id", "article_id", "id")


class CorpusError(ValueError):
    """Raised for input that can't be turned into documents (empty, undecodable, bad JSON)."""


@dataclass
class ReadStats:
    """Counts of what happened to the input, reported on the console and in the manifest."""

    files: int = 0
    files_skipped: int = 0  # in input folders, with a suffix no reader takes (.md, .html, ...)
    files_skipped_examples: list = field(default_factory=list)
    documents_read: int = 0
    documents_kept: int = 0
    empty: int = 0
    too_short: int = 0
    long_documents_split: int = 0
    rows_grouped: int = 0  # rows of sentence-per-row datasets joined into documents
    characters: int = 0
    by_split: dict = field(default_factory=lambda: {"train": 0, "val": 0})


def sample_corpus_path() -> Path:
    """The embedded sample corpus (gzip'd JSONL with text/source/title), installed with the package.
    """
    path = Path(str(resources.files("bbert.data") / "corpus" / "sample.jsonl.gz"))
    if not path.exists():
        raise FileNotFoundError(f"the embedded corpus is missing at {path}; reinstall bbert "
                                "(`pip install -e .`) or rebuild it with tools/build_corpus.py")
    return path


def read_sample_corpus(source: str | None = None) -> list[dict]:
    """The embedded corpus as a list of ``{"text", "source", "title"}`` dicts.

    ``source`` keeps one source only (``kjv``, ``python_docs`` or ``wordnet``).
   
    """
    with gzip.open(sample_corpus_path(), "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return [d for d in docs if source is None or d["source"] == source]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, encoding: str, where: str) -> str:
    # Strict: replacing or dropping bytes silently loses letters ("café" -> "caf").
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        example = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin-1"  # UTF-16's byte order marks
        raise CorpusError(
            f"{where} is not {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start} cannot be "
            f"decoded); if it is text in another encoding pass it, e.g. --encoding {example} "
            f"(encoding=... in PrepareConfig; --encoding applies to every input file, so where the "
            f"others are UTF-8 convert this one to UTF-8 instead), otherwise remove the file from the "
            f"inputs") from None
    except LookupError:
        raise CorpusError(f"unknown encoding {encoding!r}; use a Python codec name such as "
                          "utf-8, latin-1 or cp1252") from None
    text = text.removeprefix("\ufeff")  # a byte order mark (Windows tools write one) is not text
    if "\x00" in text:
        raise CorpusError(f"{where} contains NUL characters: a binary file, or text in UTF-16 "
                          f"(pass --encoding utf-16); decoded as {encoding}. Remove it from the "
                          "inputs or give its encoding")
    return text


def _lines(f, encoding: str, path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, decoded line)`` of binary file ``f``, each line ending in its newline."""
    try:
        one_byte_newline = "\n".encode(encoding) == b"\n"
    except LookupError:
        one_byte_newline = True  # _decode names the unknown encoding
    if one_byte_newline:  # UTF-8, latin-1, ...: decode line by line, naming the line of a bad byte
        for lineno, raw in enumerate(f, 1):
            yield lineno, _decode(raw, encoding, f"{path}:{lineno}")
    else:  # UTF-16 and UTF-32 spend several bytes on a newline: decode the file whole
        yield from enumerate(io.StringIO(_decode(f.read(), encoding, str(path)), newline="\n"), 1)


def read_text_file(path: Path, unit: str = "paragraph", stats: ReadStats | None = None,
                   encoding: str = "utf-8") -> Iterator[str]:
    """Documents from a plain-text file: one per blank-line-separated block, per line, or per file."""
    if unit not in TEXT_UNITS:
        raise CorpusError(f"text unit must be one of {TEXT_UNITS}, got {unit!r}")
    with _open_binary(path) as f:
        if unit == "file":
            yield _decode(f.read(), encoding, str(path))
            return
        block: list[str] = []
        for _, line in _lines(f, encoding, path):
            if unit == "line":
                yield line
            elif line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
        if block:
            yield "".join(block)


def _jsonl_records(path: Path, text_field: str, encoding: str) -> Iterator[dict]:
    with _open_binary(path) as f:
        good_rows = 0
        for lineno, line in _lines(f, encoding, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno} is not valid JSON ({e.msg}); "
                                  "JSONL needs one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                fix = ", which the rows before it have: fix or remove that row" if good_rows else \
                    "; pass --text-field NAME"
                raise CorpusError(f"{path}:{lineno} has no field {text_field!r} (found {keys}){fix}")
            _text(record, text_field, f"{path}:{lineno}")
            good_rows += 1
            yield record


def _text(record: dict, text_field: str, where: str) -> str:
    """The row's text; null is an empty document, anything else that is not a string is refused
    (a dict or a list would enter the corpus as its Python repr)."""
    value = record[text_field]
    if value is None or isinstance(value, str):
        return value or ""
    raise CorpusError(f"{where}: field {text_field!r} holds a {type(value).__name__}, not text "
                      f"({str(value)[:40]!r}); pass --text-field NAME of the field that holds the text, "
                      "or fix that row")


def group_rows(records: Iterable[dict], text_field: str = "text", document_field: str | None = None,
               rows_per_document: int = 1, stats: ReadStats | None = None) -> Iterator[str]:
    """Join consecutive rows into documents, for datasets stored one sentence per row.

    Rows with the same ``document_field`` value form one document; without that field (None,
    and none of ``DOCUMENT_ID_FIELDS`` in the first row), blocks of ``rows_per_document``
    rows do. ``rows_per_document=1`` with no id field keeps one document per row.
    """
    if rows_per_document < 1:
        raise CorpusError(f"rows_per_document must be at least 1, got {rows_per_document}")
    records = iter(records)
    first = next(records, None)
    if first is None:
        return
    records = itertools.chain([first], records)
    if document_field is None:
        document_field = next((f for f in DOCUMENT_ID_FIELDS if f in first), None)
    elif document_field not in first:
        raise CorpusError(f"the rows have no field {document_field!r} (found {list(first)}); "
                          "pass the column that names each row's document, or --rows-per-document N")
    if document_field is None and rows_per_document == 1:
        for row, record in enumerate(records, 1):
            yield _text(record, text_field, f"row {row}")
        return
    if document_field is not None:
        key = lambda indexed: indexed[1][document_field]  # noqa: E731
    else:
        key = lambda indexed: indexed[0] // rows_per_document  # noqa: E731
    for _, rows in itertools.groupby(enumerate(records), key):
        texts = [_text(record, text_field, f"row {index + 1}") for index, record in rows]
        if stats is not None and len(texts) > 1:
            stats.rows_grouped += len(texts)
        yield " ".join(texts)


def read_jsonl(path: Path, text_field: str = "text", stats: ReadStats | None = None,
               encoding: str = "utf-8", document_field: str | None = None,
               rows_per_document: int = 1) -> Iterator[str]:
    """Documents from a JSONL file (optionally gzip'd): the ``text_field`` of each line, or of
    each group of lines (see :func:`group_rows`)."""
    yield from group_rows(_jsonl_records(path, text_field, encoding), text_field, document_field,
                          rows_per_document, stats)


def read_wikiextractor(path: Path, stats: ReadStats | None = None, encoding: str = "utf-8") -> Iterator[str]:
    """Documents from one WikiExtractor output file: the body of each ``<doc ...>...</doc>`` block.

    The first line of a block is the article title, which is dropped.
    """
    with _open_binary(path) as f:
        text = _decode(f.read(), encoding, str(path))
    for match in _DOC_TAG.finditer(text):
        body = match.group(1).strip()
        yield body.split("\n", 1)[1] if "\n" in body else ""


def read_hf_dataset(name: str, config: str | None = None, split: str = "train",
                    text_field: str = "text", document_field: str | None = None,
                    rows_per_document: int = 1, stats: ReadStats | None = None) -> Iterator[str]:
    """Documents from a Hugging Face dataset on the hub, streamed (e.g. ``wikimedia/wikipedia``),
    or from a local folder written by ``Dataset.save_to_disk``.

    Rows are grouped into documents by :func:`group_rows`: BookCorpus on the hub stores one
    sentence per row, and a sentence is not a document. Fails at once when offline, naming the
    local readers instead.
    """
    import datasets  # deferred: importing datasets takes seconds, and most inputs are files

    if Path(name).is_dir():  # saved earlier with save_to_disk: no hub needed
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
    else:
        require_hub(f"the dataset {name!r}",
                    "download it once elsewhere and pass local files: JSONL (--format jsonl), "
                    "plain text, a folder of .txt books (--format books), WikiExtractor output, "
                    "or hf:PATH of a dataset saved with save_to_disk")
        loaded = datasets.load_dataset(name, config, split=split, streaming=True)
    yield from group_rows(loaded, text_field, document_field, rows_per_document, stats)


def _detect_format(path: Path) -> str:
    name = path.name
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if _WIKI_FILE.match(name):
        return "wikiextractor"
    with _open_binary(path) as f:
        head = f.read(64).lstrip()
    return "wikiextractor" if head.startswith(b"<doc") else "text"


def _files_in(folder: Path, fmt: str, stats: ReadStats) -> list[Path]:
    # Hidden files and folders (.git, .ipynb_checkpoints with its copies of the text) are not input.
    visible = sorted(p for p in folder.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    data_dir = next((p.parent for p in visible if p.name == MANIFEST_FILE and tokenizer_dir(p.parent).is_dir()), None)
    if data_dir is not None:
        raise CorpusError(f"{folder} holds a bbert data dir ({data_dir}): its manifest and tokenizer files are "
                          "not text to train on; move it out of the input folder, or pass the text files by name")
    files = [p for p in visible if p.name.endswith(TEXT_SUFFIXES) or _WIKI_FILE.match(p.name)]
    if fmt == "books":
        files = [p for p in files if p.name.endswith((".txt", ".txt.gz"))]
    taken = set(files)
    skipped = [p for p in visible if p not in taken]
    stats.files_skipped += len(skipped)
    stats.files_skipped_examples += [str(p) for p in skipped[:5 - len(stats.files_skipped_examples)]]
    if not files:
        raise CorpusError(f"folder {folder} holds no text files (looked for *.txt, *.jsonl, *.jsonl.gz "
                          "and WikiExtractor wiki_NN files); point at the files themselves or "
                          "give the right folder")
    return files


def missing_input_message(path: Path) -> str:
    return f"input {path} does not exist; check the path (files, folders, or hf:NAME for a hub dataset)"


def read_documents(inputs: Iterable[str | Path], fmt: str = "auto", text_field: str = "text",
                   text_unit: str = "paragraph", hf_split: str = "train",
                   stats: ReadStats | None = None, encoding: str = "utf-8",
                   document_field: str | None = None, rows_per_document: int = 1) -> Iterator[str]:
    """Raw documents from files, folders or ``hf:NAME[:CONFIG]`` hub datasets.

    ``fmt`` is ``auto`` (by file name and content), ``text``, ``jsonl``, ``books`` (one
    document per .txt file), ``wikiextractor`` or ``hf``. Files are decoded with ``encoding``;
    JSONL and hub rows are grouped into documents by ``document_field``/``rows_per_document``.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"format must be one of {FORMATS}, got {fmt!r}")
    stats = stats if stats is not None else ReadStats()
    inputs = list(inputs)
    if not inputs:
        raise CorpusError("no input given; pass files, folders or hf:NAME, or use sample_corpus_path()")
    for item in inputs:
        item_str = str(item)
        if fmt == "hf" or item_str.startswith("hf:"):
            name, _, config = item_str.removeprefix("hf:").partition(":")
            yield from read_hf_dataset(name, config or None, hf_split, text_field, document_field,
                                       rows_per_document, stats)
            continue
        path = Path(item)
        if not path.exists():
            raise CorpusError(missing_input_message(path))
        for file in _files_in(path, fmt, stats) if path.is_dir() else [path]:
            stats.files += 1
            kind = _detect_format(file) if fmt == "auto" else fmt
            if kind == "jsonl":
                yield from read_jsonl(file, text_field, stats, encoding, document_field, rows_per_document)
            elif kind == "wikiextractor":
                yield from read_wikiextractor(file, stats, encoding)
            elif kind == "books":
                yield from read_text_file(file, "file", stats, encoding)
            else:
                yield from read_text_file(file, text_unit, stats, encoding)


def clean_text(text: str) -> str:
    """Normalize whitespace: every run of spaces, tabs and newlines becomes one space.

    BERT's pre-tokenizer splits on any whitespace, so nothing the model sees is lost.
   
    """
    return " ".join(text.split())


def split_long_document(text: str, max_chars: int) -> list[str]:
    """Cut a document longer than ``max_chars`` at whitespace, so one huge line can't exhaust memory.
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + max_chars // 2, end)
            end = cut + 1 if cut > 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def is_validation(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic document-level split: a keyed hash of the text decides, so a document
    (and any exact duplicate of it) lands in exactly one split.
    """
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def iter_clean_documents(raw_docs: Iterable[str], *, min_chars: int = 20, max_chars: int = 1_000_000,
                         val_fraction: float = 0.01, seed: int = 0, max_documents: int | None = None,
                         max_bytes: int | None = None,
                         stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(split, cleaned_text)``: drops empty and too-short documents, splits huge ones,
    and assigns each document to ``train`` or ``val``. ``max_documents``/``max_bytes`` take a
    slice of the input.
    """
    stats = stats if stats is not None else ReadStats()
    for raw in raw_docs:
        if max_documents is not None and stats.documents_kept >= max_documents:
            return
        if max_bytes is not None and stats.characters >= max_bytes:
            return
        stats.documents_read += 1
        if not raw or raw.isspace():
            stats.empty += 1
            continue
        split = "val" if is_validation(raw, val_fraction, seed) else "train"
        pieces = split_long_document(raw, max_chars)
        stats.long_documents_split += len(pieces) > 1
        kept = False
        for piece in pieces:
            text = clean_text(piece)
            if len(text) < min_chars:
                continue
            kept = True
            stats.characters += len(text)
            stats.by_split[split] += 1
            yield split, text
        if kept:
            stats.documents_kept += 1
        else:
            stats.too_short += 1
