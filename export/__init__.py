"""Export and training side (may import torch).

Builds and trains the shipped shapes-world CLIP (``tokenizer_build``, ``clip_model``,
``train_clip``), loads any Hugging Face CLIP checkpoint, and — in later issues — turns a
checkpoint into ONNX/TensorRT files written as a Triton model repository.
"""
