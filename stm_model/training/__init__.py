"""Training: the loop, the clip forward with its memory, the datasets and the synthetic
videos."""
