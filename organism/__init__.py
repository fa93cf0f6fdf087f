"""A model organism of safety alignment degradation: a tiny LLaVA trained here (see build.py).

Importing this package is cheap (no torch); `organism.build` does the training.
"""
