"""Layer ``text``: prompts into features. :mod:`.features` holds :class:`~.features.TextFeatures`, the frozen
encoder base class and the prompt cache; :mod:`.bert` a plain-PyTorch BERT; :mod:`.sources` builds an encoder from
its source name (``minilm``, ``hf:...``, ``open_clip:...``). Imports ``core`` only.
"""
