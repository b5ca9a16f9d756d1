"""cg_tf: Coherent Gradients (Chatterjee, ICLR 2020) in TensorFlow 2."""
