"""Build bbert's embedded sample corpus (bbert/data/corpus/sample.jsonl.gz) from Debian packages.

Run once, on a Debian machine, and commit the result:

    apt-get install -y bible-kjv-text python3.11-doc wordnet-base
    .venv/bin/python tools/build_corpus.py

Sources (all public domain or permissively licensed; no GPL text):
- ``kjv``: the King James Bible (public domain), one document per chapter, via the ``bible`` program.
- ``python_docs``: the prose paragraphs of the Python 3.11 documentation (PSF licence), one
  document per HTML page; code blocks, tables and navigation are left out.
- ``wordnet``: WordNet 3.0 glosses and usage examples (WordNet 3.0 licence, permissive), one
  document per block of 40 consecutive synsets of a lexicographer file.

Each line of the output is ``{"text", "source", "title"}``. The output is byte-for-byte
reproducible: documents are sorted and gzip's timestamp is fixed.
Chapter: notebooks/02_data.ipynb.
"""
from __future__ import annotations

import argparse
import gzip
import html.parser
import io
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bbert" / "data" / "corpus" / "sample.jsonl.gz"
PY_DOCS = Path("/usr/share/doc/python3.11/html")
WORDNET = Path("/usr/share/wordnet")


def kjv_documents():
    lines = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    chapters: dict[str, list[str]] = {}
    for line in lines:
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if m:
            book, chapter, _, verse = m.groups()
            chapters.setdefault(f"{book} {chapter}", []).append(verse.strip())
    for title, verses in chapters.items():
        yield {"text": " ".join(verses), "source": "kjv", "title": title}


class _ProseParser(html.parser.HTMLParser):
    """Collect the text of <p> elements in the page body, skipping code and navigation."""

    SKIP = {"pre", "script", "style", "table", "nav"}

    def __init__(self):
        super().__init__()
        self.paragraphs: list[str] = []
        self.title = ""
        self._in_p = 0
        self._skip = 0
        self._in_title = False
        self._buf: list[str] = []
        self._body = False
        self._divs: list[bool] = []  # for each open <div>: does it start a skipped region?

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        if tag == "div" and "body" in cls.split():
            self._body = True
        if tag == "div":
            skipped = "sphinxsidebar" in cls or "related" in cls or "footer" in cls
            self._divs.append(skipped)
            self._skip += skipped
        elif tag in self.SKIP:
            self._skip += 1
        if tag == "p":
            self._in_p += 1
            self._buf = []
        if tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "div" and self._divs:
            self._skip -= self._divs.pop()
        elif tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag == "p" and self._in_p:
            self._in_p -= 1
            text = " ".join("".join(self._buf).split())
            if self._body and not self._skip and len(text.split()) >= 6:
                self.paragraphs.append(text)
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._in_p and not self._skip:
            self._buf.append(data)


def python_docs_documents():
    for page in sorted(PY_DOCS.rglob("*.html")):
        rel = page.relative_to(PY_DOCS).as_posix()
        if rel.startswith(("_", "genindex", "py-modindex", "search", "whatsnew/changelog")):
            continue
        parser = _ProseParser()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        if len(parser.paragraphs) >= 2:
            title = " ".join(parser.title.split()).split(" \u2014 ")[0]
            yield {"text": "\n\n".join(parser.paragraphs), "source": "python_docs", "title": title or rel}


def wordnet_documents(synsets_per_document: int = 40, max_bytes: int = 3_500_000):
    lexnames = {}
    for line in (WORDNET / "lexnames").read_text().splitlines() if (WORDNET / "lexnames").exists() else []:
        num, name, _ = line.split()
        lexnames[int(num)] = name
    groups: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lex, n_words = int(parts[1]), int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            gloss = " ".join(gloss.split())
            if '"' not in gloss:
                continue  # keep glosses with a usage example: they read as prose
            groups.setdefault(lexnames.get(lex, f"{pos}.{lex}"), []).append(
                f"{', '.join(words)}: {gloss.rstrip(' ;')}.")
    total = 0
    for lexname in sorted(groups):
        entries = groups[lexname]
        for start in range(0, len(entries), synsets_per_document):
            text = "\n".join(entries[start:start + synsets_per_document])
            total += len(text)
            if total > max_bytes:
                return
            yield {"text": text, "source": "wordnet",
                   "title": f"{lexname} {start // synsets_per_document + 1}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    docs = list(kjv_documents()) + list(python_docs_documents()) + list(wordnet_documents())
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    by_source: dict[str, list[int]] = {}
    for doc in docs:
        by_source.setdefault(doc["source"], []).append(len(doc["text"]))
    for source, sizes in by_source.items():
        print(f"{source:12s} {len(sizes):6d} documents {sum(sizes) / 1e6:6.2f} MB of text")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB compressed)")


if __name__ == "__main__":
    main()
