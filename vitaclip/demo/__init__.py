"""A small procedural "demo world": short videos of one coloured shape doing one thing, with captions.

``vitaclip.demo.world`` generates the videos (numpy, Pillow and PyAV only, no torch) and ``python -m vitaclip.demo``
is its command line. The world is small enough to train and test a model on in minutes, and its labels split into
seen and unseen combinations of known colours, shapes and motions for zero-shot checks.
"""
