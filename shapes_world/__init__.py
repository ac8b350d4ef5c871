"""The shapes world: the embedded, fully-known default domain of the product.

Compositional prompts ("three blue triangles on a grass background") and procedurally rendered
images whose ground truth is known, used to train the shipped CLIP and reward head, to simulate
human feedback, and to build the TIA2-style benchmark. Torch-free: Pillow and numpy only.

Modules: ``vocab`` (the words), ``scene`` (what an image contains / what a prompt claims),
``grammar`` (scene → English), ``render`` (scene → pixels), ``perturb`` (one-attribute-off
scenes), ``sampling`` (random scenes and captions), ``benchmark`` (held-out labelled sets).
"""
