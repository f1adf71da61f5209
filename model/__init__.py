"""What a Llama is, for every layer above: config, tensor names and shapes, where tensors come from."""
