"""Layer ``evaluation``: how good a segmentation is. :mod:`.metrics` (Dice and the rest, written once),
:mod:`.tables` (evaluating folders and manifests, and the tables ``textseg evaluate`` prints) and :mod:`.demo`
(``textseg demo``). Imports the layers below it, never ``service`` or ``app``.
"""
