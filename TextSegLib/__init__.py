"""TextSegLib: the computing half of TextSeg (no Slicer, no Qt).

Text-guided segmentation of CT and MR volumes with the networks of three papers: TexLiverNet, the multimodal
representation distribution learning network (MMRDL) and FreqMedCLIP. The same library serves the Slicer module,
headless Slicer scripts, the ``textseg`` command and ``Training/``.
"""

__version__ = "0.1.0"
