"""Systems of several chips: wafer systems and the GPU baseline."""
