"""`stm annotate`: interactive video segmentation in a browser. server.py serves one video's
frames, runs the rounds of an InteractiveSession and saves them; static/ is the page (plain
HTML, CSS and JavaScript: no build step, nothing fetched from the network)."""
