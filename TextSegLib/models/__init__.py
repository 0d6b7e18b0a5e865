"""The networks: the registry (:mod:`.registry`), shared blocks (:mod:`.blocks`), one module per paper's network
(:mod:`.texlivernet`, :mod:`.mmrdl`, :mod:`.freqmedclip`), ensembles (:mod:`.ensemble`) and losses (:mod:`.losses`).

Layer ``models``: imports ``core`` and ``text`` only. Importing the package registers the three networks.
"""

from TextSegLib.models import freqmedclip, mmrdl, texlivernet  # noqa: F401  (each registers itself)
