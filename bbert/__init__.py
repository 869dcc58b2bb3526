"""bbert: budget BERT pretraining, the 24hBERT recipe as a course book and a package."""

__version__ = "0.1.0"
