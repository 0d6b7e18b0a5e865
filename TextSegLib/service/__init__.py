"""Layer ``service``: segmentation in a worker process. :mod:`.protocol` (the wire format and the light types,
standard library and NumPy only), :mod:`.client` (:class:`~.client.RemoteWorker`), :mod:`.local` (the worker
process this computer starts) and :mod:`.server` (``textseg serve``). The client side never imports torch, so 3D
Slicer's process can use it. Imports ``core``, ``io``, and (the server only) ``engine``.
"""
