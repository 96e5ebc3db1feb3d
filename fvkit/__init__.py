"""fvkit: function vectors (Todd et al., ICLR 2024) across model architectures.

Everything model-specific lives in a :class:`fvkit.model_spec.ModelSpec`; the
pipeline modules only ever reach a model through :mod:`fvkit.adapters`.
"""

__version__ = "0.1.0"
