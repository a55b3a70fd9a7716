"""Structural techniques: what changes a torch model's weights or layers before it is exported.

Each technique is one module with a :class:`Technique` subclass: its name and variant-name tag,
its options schema (a pydantic model with the ``amounts`` to try and the KD fine-tune that
follows), a one-line recipe a person can read, and ``apply``. Defining the subclass registers it,
so a new technique is one new module (imported by whoever uses it): the config accepts
``variants.shrink.<name>``, the variant plan builds its variants, and ``edgeopt.shrink.run`` runs it.

Each technique's module also holds its algorithm on torch models, usable alone from a notebook
(``prune.prune_channels``, ``lowrank.factorize_lowrank``, ``sparsity.sparsify``). Modules here import
torch only inside functions: the config imports them to validate options in well under a second.
"""

# The built-in techniques register themselves on import.
from edgeopt.shrink import lowrank, prune, sparsity  # noqa: E402,F401
