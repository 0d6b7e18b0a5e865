"""Layer ``core``: what every other layer needs and nothing else; imports no other TextSeg layer, no torch.

- :mod:`.errors`: :class:`~.errors.TextSegError` and its family; "the user's problem" is decided by that one class.
- :mod:`.messages`: one-line messages from exceptions, key mismatches and unknown keys.
- :mod:`.configs`: dataclasses filled from TOML or JSON (lists made tuples where a field is a tuple).
- :mod:`.files`: atomic and all-or-none writes, and the check that an output can be written.
- :mod:`.options`: every user-settable value of a segmentation run, validated once (prompt, threshold, batch
  size, modality, device), for every front end.
- :mod:`.settings`: environment variables and default ports, read in one place.
- :mod:`.results`: what a run produces (:class:`~.results.SegmentationResult`) and how it is stopped.
"""
