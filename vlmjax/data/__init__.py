"""Data: the built-in shapes data set (`vlmjax.data.shapes`) and the input pipeline.

Submodules are imported where they are used; importing this package loads nothing heavy.
"""
