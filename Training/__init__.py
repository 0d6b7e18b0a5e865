"""TextSeg training: DDP training of every registered network, dataset handling and converters.

Run ``torchrun --nproc_per_node=N Training/train.py --config Training/configs/<network>.toml --output <folder>``
(or plain ``python Training/train.py ...`` for one process). See the README's "Training" section.
"""
