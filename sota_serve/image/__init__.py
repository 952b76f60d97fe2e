"""The image pipeline: decoding within limits, preprocessing (CPU and device) into the
crops each TTA policy takes, and the out-of-distribution screen on those crops."""
