"""Checkpoint -> rules -> a stream of quantized and float tensors -> a writer; what convert, quantize and build call."""
