"""Datasets of the book's experiments.

``ci`` scale uses data that ships offline (scikit-learn's 8x8 digits, CPython's own English text);
``paper`` scale downloads the real datasets (for Colab), with a cache and checksum verification.
One module per kind of data; every public name is re-exported here.
"""

from .images import ImageData, iid_split, load_digits, load_images, shard_split
from .text import TextCorpus, load_text_corpus, pydoc_corpus, segment_ids
