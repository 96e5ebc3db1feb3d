"""fvkit: function vectors (Todd et al., ICLR 2024) across model architectures.

Everything model-specific lives in a :class:`fvkit.models.spec.ModelSpec`; the
pipeline modules only ever reach a model through :mod:`fvkit.models.adapters`.
"""

__version__ = "0.1.0"
