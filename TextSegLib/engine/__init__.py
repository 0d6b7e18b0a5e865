"""Layer ``engine``: from a checkpoint file to a mask. :mod:`.checkpoints` (the file format), :mod:`.catalogue`
(the models a user can pick), :mod:`.preprocessing`, :mod:`.devices` (where to run), :mod:`.loading` (models and
their text encoders, cached), :mod:`.inference` (the slice engine), :mod:`.batching` (the CPU batch size, timed and
remembered), :mod:`.acceleration` (BatchNorm folding, compile, the CUDA pipeline) and :mod:`.run` (the one run
every front end uses: options, device, out-of-memory fall-back). Imports ``core``, ``io``, ``text`` and ``models``.
"""
