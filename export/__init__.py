"""Offline stage: the Attention U-Net, its training, ONNX export, quantization and evaluation."""
