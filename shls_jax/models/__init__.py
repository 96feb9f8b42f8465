"""The SHLS network: backbone, superfeatures and (later) the decoder.

Import the modules directly, e.g. `from shls_jax.models import superfeatures`.
"""
