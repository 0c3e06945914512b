"""Offline TFDS builders. Importing a module registers its builder with TFDS under its snake-case name."""
