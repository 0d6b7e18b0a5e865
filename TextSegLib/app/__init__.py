"""Layer ``app``: the front ends. :mod:`.cli` (the ``textseg`` command), :mod:`.web` (``textseg web``),
:mod:`.uploads` (files a browser sends) and :mod:`.mrml` (volumes and segments in MRML scenes, shared by the Slicer
panel and the web page). May import every layer below.
"""
