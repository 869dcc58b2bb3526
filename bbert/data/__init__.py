"""bbert.data: raw text to packed, masked pretraining samples. Chapter: ``notebooks/02_data.ipynb``.

    readers.py    corpus readers (text, JSONL, books, WikiExtractor, hub), cleaning, train/val split
    layout.py     the data dir's file names: manifest, tokenizer, shards, checksum sidecar
    tokenizer.py  train or load a WordPiece tokenizer that transformers can load
    shards.py     packing into max_seq_length samples, shard files, the manifest, checksum checks
    masking.py    BERT's 15% / 80-10-10 masking, dynamic or static
    dataset.py    the distributed-aware, deterministic, resumable PyTorch dataset and loader
    prepare.py    `bbert prepare`, the pipeline end to end
"""
from bbert.data.dataset import PretrainingDataset, build_pretraining_loader
from bbert.data.layout import manifest_path, tokenizer_dir
from bbert.data.masking import IGNORE_INDEX, MaskingConfig, Masker
from bbert.data.prepare import PrepareConfig, prepare
from bbert.data.readers import (CorpusError, ReadStats, clean_text, group_rows, is_validation,
                                read_documents, read_hf_dataset, read_jsonl, read_sample_corpus,
                                read_text_file, read_wikiextractor, sample_corpus_path)
from bbert.data.shards import (DataDirError, Packer, check_data_dir, choose_dtype, data_fingerprint,
                               load_manifest, verify_shards)
from bbert.data.tokenizer import (TokenizerError, check_tokenizer, load_tokenizer, special_ids,
                                  tokenizer_fingerprint, train_tokenizer)

__all__ = [
    "PretrainingDataset", "build_pretraining_loader", "IGNORE_INDEX", "MaskingConfig", "Masker",
    "PrepareConfig", "prepare", "CorpusError", "ReadStats", "clean_text", "group_rows", "is_validation",
    "read_documents", "read_hf_dataset", "read_jsonl", "read_sample_corpus", "read_text_file",
    "read_wikiextractor", "sample_corpus_path", "DataDirError", "Packer", "check_data_dir",
    "choose_dtype", "data_fingerprint", "load_manifest", "verify_shards", "TokenizerError",
    "check_tokenizer", "load_tokenizer", "special_ids", "tokenizer_fingerprint", "train_tokenizer",
    "manifest_path", "tokenizer_dir",
]
