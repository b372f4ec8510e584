"""Model-space data: preprocessing transforms and the intensity map (preprocess), manifest items to
prepared tensors (prepared). Shared by training, synthesis and quality."""
