"""Image models: backbones and heads, the hdf5 image data, training, prediction, multi-GPU."""
