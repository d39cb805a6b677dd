"""What is measured: the metric registry, intervals and paired comparisons, FID and CLIP score."""
