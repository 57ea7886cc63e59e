"""Helpers that import none of Keyaos's apps, so every app may use them."""
