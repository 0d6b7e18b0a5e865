"""Layer ``io``: files and formats, no torch: volumes and their geometry (:mod:`.volumes`), ``.seg.nrrd`` files and
segment tags (:mod:`.segnrrd`), Slicer terminology for prompts (:mod:`.terminology`) and training or evaluation
manifests (:mod:`.manifests`). Imports ``core`` only.
"""
