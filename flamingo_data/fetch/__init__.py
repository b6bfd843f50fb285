"""Bounded http fetches and img2dataset: download, worker hook, reading its output."""
