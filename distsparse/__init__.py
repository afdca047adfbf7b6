"""distsparse: sparse transfer learning for BERT-family models on every rank alike."""
__version__ = "0.1.0"
