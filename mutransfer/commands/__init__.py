"""One module per thing a user runs: tune (tuning, and tune_api for Python), scale, coord-check
(coord_check, and coord_api for Python), sweep, load/export. Each composes run/ and engine/ and
renders through report/; cli.py only parses flags and calls them."""
