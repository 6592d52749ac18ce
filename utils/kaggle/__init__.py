"""Kaggle: kernel builds, what runs inside a kernel first, and the end-to-end Kaggle workflow."""
