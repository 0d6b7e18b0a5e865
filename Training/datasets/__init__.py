"""Public data sets converted into volumes, label maps and TextSeg manifests.

    python -m Training.datasets openkbp --source open-kbp/provided-data --output data/openkbp

One module per data set (``openkbp.py``: OpenKBP's head-and-neck CTs); ``__main__.py`` is the command.
"""
