"""Segmenting videos: the session core every segmenter shares, the video and batch
segmenters, both directions from a later first mask, many videos at once and dataset runs."""
