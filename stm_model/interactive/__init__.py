"""Interactive segmentation: the session that re-segments every frame after each round
of scribbles, the DAVIS scribble format, and the robot evaluation of the DAVIS challenge."""
