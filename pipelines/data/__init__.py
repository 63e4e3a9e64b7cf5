"""Data stages: raw documents -> pretraining examples (Ray Data), and the loader."""
